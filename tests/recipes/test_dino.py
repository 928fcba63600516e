"""DINO: the loss against a loop over crop pairs, the teacher-temperature warm-up, the centre and teacher updates,
the frozen last layer, ViT crops of two sizes, and a 2-worker step against one process on the whole batch."""
import math

import pytest
import torch

from sslab.recipes.backbones import ModelConfig, build_backbone
from sslab.recipes.dino import DINO, DINOConfig
from sslab.recipes.protocol import RecipeContext

SIZE, LOCAL = 16, 7  # 7 px locals: not a whole number of 4 px patches, so the ViT pads them


def make(model="small_cnn", epochs=4, seed=0, **cfg):
    torch.manual_seed(seed)
    mc = ModelConfig(name=model, width=4, patch_size=4, depth=1)
    ctx = RecipeContext(make_backbone=lambda in_chans=1: build_backbone(mc, in_chans, SIZE), num_train=32,
                        channels=1, image_size=SIZE, epochs=epochs, batch_size=8)
    return DINO(DINOConfig(**{"hidden": 16, "bottleneck": 8, "out_dim": 12, "n_local": 2, **cfg}), ctx).double()


def crops(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, s, s, generator=g, dtype=torch.float64) for s in (SIZE, SIZE, LOCAL, LOCAL)]


def dino_reference(student, teacher, center, ts, tt) -> float:
    """Caron et al. 2021, Algorithm 1 with multi-crop: teacher crop i (softmax((t - C)/tt)) against every other
    student crop v (log softmax(s/ts)), cross-entropy per image, mean over images and pairs."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            pairs += 1
            for row in range(len(s)):
                e = [math.exp((t[row][k] - center[k]) / tt) for k in range(len(center))]
                logz = math.log(sum(math.exp(x / ts) for x in s[row]))
                total -= sum(e[k] / sum(e) * (s[row][k] / ts - logz) for k in range(len(e))) / len(s)
    return total / pairs


def test_loss_matches_reference_with_a_centre():
    r = make()
    r.center.copy_(torch.randn(1, 12, dtype=torch.float64))
    views = crops(3, 0)
    loss = r(views, {}, 0.1).loss.item()
    with torch.no_grad():
        s = r.student(views)[1].split(3)
        t = r.teacher(views[:2])[1].split(3)
    tt = 0.04 + (0.07 - 0.04) * 0.1 / 0.3  # in the warm-up
    ref = dino_reference([x.tolist() for x in s], [x.tolist() for x in t], r.center[0].tolist(), 0.1, tt)
    assert loss == pytest.approx(ref, rel=1e-10)


def test_teacher_temperature_warms_up_linearly():
    r = make()
    for progress, want in ((0.0, 0.04), (0.15, 0.055), (0.3, 0.07), (0.9, 0.07)):
        assert r.teacher_temp(progress) == pytest.approx(want)


def test_centre_teacher_and_frozen_last_layer():
    r = make(epochs=4)  # epoch 1 = progress below 0.25
    views = crops(4, 1)
    with torch.no_grad():
        t = r.teacher(views[:2])[1]  # [2n, K]: the teacher sees the globals only
    center = r.center.clone()
    r(views, {}, 0.1).loss.backward()
    assert all(p.grad is None for p in r.teacher.parameters())
    r.before_optimizer_step(0.1)
    assert r.student.last.weight.grad is None and r.student.mlp[0].weight.grad is not None
    with torch.no_grad():  # a stand-in for an optimizer step
        for p in r.student.parameters():
            p.add_(0.1)
    before = [p.clone() for p in r.teacher.parameters()]
    r.after_step(0.1)
    torch.testing.assert_close(r.center, 0.9 * center + 0.1 * t.mean(0, keepdim=True))  # eq. 4
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 0.1) + 1) / 2
    for b, p, s in zip(before, r.teacher.parameters(), r.student.parameters()):
        torch.testing.assert_close(p, m * b + (1 - m) * s)
    r.zero_grad()
    r(views, {}, 0.3).loss.backward()
    r.before_optimizer_step(0.3)
    assert r.student.last.weight.grad is not None  # after the first epoch the last layer learns


def test_vit_student_takes_crops_of_two_sizes():
    r = make("vit_tiny")
    out = r(crops(2, 2), {}, 0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.embedding.shape == (2, r.student.backbone.feat_dim)
    assert r.student.backbone.pos_embed.grad.abs().sum() > 0


def _one_step(rank, world, n_all):
    """One data-parallel DINO step on this worker's slice of the batch (ViT: no batch statistics)."""
    from torch.nn.parallel import DistributedDataParallel

    r = make("vit_tiny")
    views = [v[rank * n_all // world:(rank + 1) * n_all // world] for v in crops(n_all, 5)]
    model = DistributedDataParallel(r) if world > 1 else r
    opt = torch.optim.SGD([p for p in r.parameters() if p.requires_grad], lr=0.5)
    out = model(views, {}, 0.5)
    out.loss.backward()
    r.before_optimizer_step(0.5)
    opt.step()
    r.after_step(0.5)
    return r.center.clone(), [p.detach().clone() for p in r.teacher.parameters()]


def test_two_workers_equal_one_process_on_the_whole_batch(gloo):
    (c0, t0), (c1, t1) = gloo(_one_step, 2, 6)
    c, t = _one_step(0, 1, 6)
    assert torch.equal(c0, c1) and all(torch.equal(a, b) for a, b in zip(t0, t1))  # identical on every worker
    torch.testing.assert_close(c0, c)  # the centre is the mean over the global batch, not the worker's half
    assert not torch.allclose(c0, _one_step(0, 1, 3)[0])
    for a, b in zip(t0, t):
        torch.testing.assert_close(a, b)
