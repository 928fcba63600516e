"""BYOL: the loss against the paper's formula written out, the target's cosine EMA, no gradient into the target,
and targets identical on data-parallel workers."""
import math

import numpy as np
import pytest
import torch

from sslab.datasets.pipeline import DataConfig
from sslab.recipes.backbones import ModelConfig, build_backbone
from sslab.recipes.byol import BYOL, BYOLConfig, byol_views
from sslab.recipes.protocol import RecipeContext

SIZE = 12


def make(seed=0, **cfg):
    torch.manual_seed(seed)
    ctx = RecipeContext(make_backbone=lambda in_chans=1: build_backbone(ModelConfig(width=4), in_chans, SIZE),
                        num_train=32, channels=1, image_size=SIZE, epochs=2, batch_size=8)
    return BYOL(BYOLConfig(**{"hidden": 16, "dim": 8, **cfg}), ctx)


def rand_views(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=dtype) for _ in range(2)]


def byol_reference(p1, p2, t1, t2) -> float:
    """Grill et al. 2020, eq. 2 symmetrised: ||p/|p| - t'/|t'|||^2 for both view orders, mean over images."""
    total = 0.0
    for i in range(len(p1)):
        for p, t in ((p1[i], t2[i]), (p2[i], t1[i])):
            total += sum((p / np.linalg.norm(p) - t / np.linalg.norm(t)) ** 2)
    return total / len(p1)


def test_loss_matches_reference():
    r = make().double()
    views = rand_views(6, 0, torch.float64)
    loss = r(views, {}, 0.3).loss.item()
    with torch.no_grad():  # the same modules again, in train mode: same batch statistics, same outputs
        p1, p2 = r.predictor(r.online(torch.cat(views))).split(6)
        t1, t2 = r.target(torch.cat(views)).split(6)
    assert loss == pytest.approx(byol_reference(*(x.numpy() for x in (p1, p2, t1, t2))), rel=1e-10)


def test_target_gets_no_gradient_and_follows_the_cosine_ema():
    r = make()
    r(rand_views(4, 1), {}, 0.5).loss.backward()
    assert all(p.grad is None for p in r.target.parameters())
    assert all(p.grad is not None for p in r.online.parameters())
    for progress in (0.0, 0.5, 1.0):
        with torch.no_grad():  # a stand-in for an optimizer step of the online network
            for p in r.online.parameters():
                p.add_(torch.randn_like(p))
        before = [t.clone() for t in r.target.parameters()]
        r.after_step(progress)
        tau = 1 - (1 - 0.996) * (math.cos(math.pi * progress) + 1) / 2  # §3.2
        for b, t, o in zip(before, r.target.parameters(), r.online.parameters()):
            torch.testing.assert_close(t, tau * b + (1 - tau) * o)


def test_views_are_the_papers_asymmetric_pair():
    v0, v1 = (spec for _, spec in byol_views(BYOLConfig(), DataConfig(path="x"), 28).views)
    assert (v0.blur_p, v0.solarize_p, v1.blur_p, v1.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    with pytest.raises(ValueError, match="data.blur_p"):
        byol_views(BYOLConfig(), DataConfig(path="x", blur_p=0.5), 28)


def _ddp_steps(rank, world):
    """Two data-parallel steps on this worker's own images; returns the target and online parameters."""
    from torch.nn.parallel import DistributedDataParallel

    r = make(seed=0)
    model = DistributedDataParallel(r, broadcast_buffers=False)
    opt = torch.optim.SGD([p for p in r.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for s in range(2):
        out = model(rand_views(4, 10 * rank + s), {}, s / 4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        r.after_step(s / 4)
    return [t.detach() for t in r.target.parameters()], [o.detach() for o in r.online.parameters()]


def test_ema_targets_identical_across_workers(gloo):
    (t0, o0), (t1, o1) = gloo(_ddp_steps, 2)
    start = [t.detach() for t in make(seed=0).target.parameters()]
    for a, b, s in zip(t0, t1, start):
        assert torch.equal(a, b)  # every worker applies the same averaged update and the same EMA
    assert any(not torch.equal(a, s) for a, s in zip(t0, start)), "the target did not move"
    assert all(torch.equal(a, b) for a, b in zip(o0, o1))

