"""MoCo v3: the symmetrised, 2*tau-scaled contrastive loss against a float64 loop, the cosine momentum schedule,
the frozen random patch projection of a ViT, and 2 gloo workers equal to one process on the global batch."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sslab import dist
from sslab.recipes.backbones import ModelConfig, build_backbone
from sslab.recipes.mocov3 import MoCoV3, MoCoV3Config, contrast
from sslab.recipes.protocol import RecipeContext

from conftest import FlatLinear

SIZE = 4


def make_v3(cfg, make_backbone=None, batch=8, without_bn=False):
    torch.manual_seed(0)
    ctx = RecipeContext(make_backbone=make_backbone or (lambda in_chans=1: FlatLinear(in_chans * SIZE * SIZE)),
                        num_train=64, channels=1, image_size=SIZE, epochs=1, batch_size=batch)
    recipe = MoCoV3(cfg, ctx)
    if without_bn:  # BN statistics are per worker by design (SyncBN on GPU): compare the rest exactly
        for name, mod in list(recipe.named_modules()):
            if isinstance(mod, nn.BatchNorm1d):
                parent, _, child = name.rpartition(".")
                setattr(recipe.get_submodule(parent), child, nn.Identity())
    return recipe


def ctr_reference(q, k, t):
    """Alg. 1's ctr in float64 loops: mean_i -log softmax_j(q_i.k_j / t)[i] over all N keys, times 2t."""
    q = [v / np.linalg.norm(v) for v in np.asarray(q, dtype=np.float64)]
    k = [v / np.linalg.norm(v) for v in np.asarray(k, dtype=np.float64)]
    total = 0.0
    for i in range(len(q)):
        logits = [q[i] @ k[j] / t for j in range(len(k))]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(q) * 2 * t


@pytest.mark.parametrize("n,d,t", [(1, 3, 0.2), (5, 4, 0.2), (8, 16, 1.0)])
def test_contrast_matches_reference(n, d, t):
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert contrast(q, k, t).item() == pytest.approx(ctr_reference(q, k, t), rel=1e-10)


def views(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


def test_symmetrised_loss_and_cosine_momentum():
    cfg = MoCoV3Config(hidden=16, dim=8, temperature=0.2)
    recipe = make_v3(cfg).double()
    assert [sum(isinstance(m, nn.Linear) for m in h) for h in (recipe.projector, recipe.predictor)] == [3, 2]
    assert not any(n.startswith("momentum_") and p.requires_grad for n, p in recipe.named_parameters())
    x1, x2 = views(1)
    with torch.no_grad():  # queries: backbone -> projector -> predictor; keys: momentum backbone -> projector
        q1, q2 = (recipe.predictor(recipe.projector(recipe.backbone(x))) for x in (x1, x2))
        k1, k2 = (recipe.momentum_projector(recipe.momentum_backbone(x)) for x in (x1, x2))
    out = recipe([x1, x2], {}, 0.5)
    expect = ctr_reference(q1, k2, 0.2) + ctr_reference(q2, k1, 0.2)
    assert out.loss.item() == pytest.approx(expect, rel=1e-10)
    out.loss.backward()
    assert all(p.grad is None for n, p in recipe.named_parameters() if n.startswith("momentum_"))
    assert recipe.predictor[0].weight.grad.abs().sum() > 0

    with torch.no_grad():
        for p in recipe.backbone.parameters():
            p.add_(1.0)
    online = recipe.backbone.fc.weight.clone()
    for progress, m in [(0.0, 0.99), (0.5, 0.995), (1.0, 1.0)]:  # m = 1 - 0.01 * (cos(pi p) + 1) / 2
        before = recipe.momentum_backbone.fc.weight.clone()
        recipe.after_step(progress)
        torch.testing.assert_close(recipe.momentum_backbone.fc.weight, m * before + (1 - m) * online)


def test_vit_with_frozen_random_patch_projection():
    model = ModelConfig(name="vit_tiny", patch_size=4, depth=1, freeze_patch_embed=True)
    recipe = make_v3(MoCoV3Config(hidden=32, dim=16, temperature=0.2),
                     lambda in_chans=1: build_backbone(model, in_chans, 16))
    patch = {n: p.clone() for n, p in recipe.named_parameters() if "patch_embed" in n}
    assert len(patch) == 4 and not any(p.requires_grad for n, p in recipe.named_parameters() if "patch_embed" in n)
    opt = torch.optim.SGD([p for p in recipe.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    out = recipe([torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)], {}, 0.1)
    out.loss.backward()
    for n, p in recipe.named_parameters():
        if "patch_embed" in n or n.startswith("momentum_"):
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    recipe.after_step(0.1)
    for n, p in recipe.named_parameters():  # the random projection stays as initialised, online and momentum
        if "patch_embed" in n:
            torch.testing.assert_close(p, patch[n], rtol=0, atol=0)


# ---- two gloo workers against one process --------------------------------------------------------------------

def _v3_steps(rank, world, xs):
    recipe = make_v3(MoCoV3Config(hidden=12, dim=5, temperature=0.2), without_bn=True).double()
    opt = torch.optim.SGD([p for p in recipe.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    n = xs[0][0].shape[0] // world
    out = []
    for s, x in enumerate(xs):
        res = recipe([v[rank * n:(rank + 1) * n] for v in x], {}, s / len(xs))
        opt.zero_grad()
        res.loss.backward()
        grads = {k: dist.all_reduce(p.grad.clone(), "mean") for k, p in recipe.named_parameters() if p.requires_grad}
        for k, p in recipe.named_parameters():
            if p.requires_grad:
                p.grad.copy_(grads[k])
        opt.step()
        recipe.after_step(s / len(xs))
        out.append({"loss": res.loss.item(), "grads": grads,
                    "momentum": {k: v.clone() for k, v in recipe.state_dict().items() if k.startswith("momentum_")}})
    return out


def _v3_worker(rank, world, xs):
    torch.set_num_threads(1)
    return _v3_steps(rank, world, xs)


def test_two_workers_equal_one_process(gloo):
    xs = [views(10 + s) for s in range(2)]
    single = _v3_steps(0, 1, xs)
    results = gloo(_v3_worker, 2, xs)
    for s, ref in enumerate(single):
        assert np.mean([r[s]["loss"] for r in results]) == pytest.approx(ref["loss"], rel=1e-10)
        for r in results:
            for k, g in ref["grads"].items():
                torch.testing.assert_close(r[s]["grads"][k], g, msg=f"step {s}: gradient of {k}")
            for k, v in ref["momentum"].items():
                torch.testing.assert_close(r[s]["momentum"][k], v, msg=f"step {s}: {k}")
