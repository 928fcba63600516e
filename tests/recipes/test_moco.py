"""MoCo v1/v2: InfoNCE against a float64 loop, one step against a plain computation (loss, momentum update,
queue), the FIFO queue, the config errors, the BN-group emulation against a hand-written per-group BN, and 2 gloo
workers equal to one process on the global batch (loss, gradients, queue; shuffle-BN round trip)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslab.config import ConfigError
from sslab import dist
from sslab.platform.spec import make_spec
from sslab.recipes.losses import info_nce
from sslab.recipes.moco import MoCo, MoCoConfig, MoCoV2Config
from sslab.recipes.protocol import RecipeContext

SIZE = 4


class FlatLinear(nn.Module):
    """A BN-free encoder: per-sample outputs do not depend on the rest of the batch."""

    def __init__(self, in_features, feat_dim=6, bn=False):
        super().__init__()
        self.fc = nn.Linear(in_features, feat_dim)
        self.bn = nn.BatchNorm1d(feat_dim) if bn else nn.Identity()
        self.feat_dim = feat_dim

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def make_moco(cfg, batch=8, bn=False, seed=0):
    torch.manual_seed(seed)
    ctx = RecipeContext(make_backbone=lambda in_chans=1: FlatLinear(in_chans * SIZE * SIZE, bn=bn), num_train=64,
                        channels=1, image_size=SIZE, epochs=1, batch_size=batch)
    return MoCo(cfg, ctx).double()


def info_nce_reference(q, k, neg, t):
    """He et al. 2019, eq. 1 per query, in float64 loops: -log exp(q.k+/t) / sum over {k+} + negatives."""
    q, k, neg = (np.asarray(a, dtype=np.float64) for a in (q, k, neg))
    total = 0.0
    for i in range(len(q)):
        logits = [q[i] @ k[i] / t] + [q[i] @ neg[j] / t for j in range(len(neg))]
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(q)


@pytest.mark.parametrize("n,kq,d,t", [(1, 1, 3, 0.07), (4, 12, 5, 0.2), (6, 3, 8, 1.0)])
def test_info_nce_matches_reference(n, kq, d, t):
    g = torch.Generator().manual_seed(n + kq)
    q, k, neg = (F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1) for m in (n, n, kq))
    assert info_nce(q, k, neg, t).item() == pytest.approx(info_nce_reference(q, k, neg, t), rel=1e-10)


def views(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("cfg_cls", [MoCoConfig, MoCoV2Config])
def test_step_matches_plain_computation(cfg_cls):
    cfg = cfg_cls(queue_size=16, momentum=0.9)
    recipe = make_moco(cfg)
    assert len([m for m in recipe.head if isinstance(m, nn.Linear)]) == cfg.head_layers
    queue0 = recipe.queue.clone()
    key0 = {n: p.clone() for n, p in recipe.named_parameters() if n.startswith("key_")}
    x0, x1 = views(1)
    with torch.no_grad():  # queries from view 0 by the query encoder, keys from view 1 by the key encoder
        q = F.normalize(recipe.head(recipe.backbone(x0)), dim=1)
        k = F.normalize(recipe.key_head(recipe.key_backbone(x1)), dim=1)
    opt = torch.optim.SGD([p for p in recipe.parameters() if p.requires_grad], lr=0.5)
    out = recipe([x0, x1], {}, 0.3)
    assert out.loss.item() == pytest.approx(info_nce_reference(q, k, queue0, cfg.temperature), rel=1e-10)
    out.loss.backward()
    assert all(p.grad is None for n, p in recipe.named_parameters() if n.startswith("key_"))
    opt.step()
    recipe.after_step(0.3)
    online = dict(recipe.named_parameters())
    for name, before in key0.items():  # key <- m key + (1 - m) query, after the query's SGD step
        expect = 0.9 * before + 0.1 * online[name.replace("key_", "", 1)]
        torch.testing.assert_close(online[name], expect)
    torch.testing.assert_close(recipe.queue[:8], k)           # this batch's keys replaced the oldest rows
    torch.testing.assert_close(recipe.queue[8:], queue0[8:])
    assert int(recipe.queue_ptr) == 8


def test_queue_is_fifo_and_wraps():
    recipe = make_moco(MoCoConfig(queue_size=16))
    enqueued = []
    for s in range(3):
        recipe(views(s), {}, s / 3)
        enqueued.append(recipe._keys.clone())
        recipe.after_step(s / 3)
    # step 0 -> rows 0-7, step 1 -> rows 8-15, step 2 wraps and overwrites step 0's keys
    torch.testing.assert_close(recipe.queue, torch.cat([enqueued[2], enqueued[1]]))
    assert int(recipe.queue_ptr) == 8
    assert {"queue", "queue_ptr"} <= set(recipe.state_dict())


def test_bad_queue_and_groups_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe.queue_size=20 must be a multiple of the global batch"):
        make_moco(MoCoConfig(queue_size=20), batch=8)
    for recipe, overrides, key in [
            ("mocov1", {"engine.batch_size": 48, "recipe.queue_size": 1000}, "recipe.queue_size"),
            ("mocov2", {"engine.batch_size": 8, "engine.workers": 2, "recipe.queue_size": 16,
                        "recipe.bn_groups": 3}, "recipe.bn_groups")]:
        spec = make_spec(recipe, {"data.path": str(tmp_path), **overrides})
        with pytest.raises(ConfigError, match=key):
            MoCo.check_spec(spec, None)
    with pytest.raises(ConfigError, match="recipe.bn_groups=3 must divide the per-worker batch 8"):
        make_moco(MoCoConfig(queue_size=16, bn_groups=3))(views(0), {}, 0.0)


def manual_group_bn(h, groups, bn):
    """Training-mode BatchNorm1d written out: per group, (h - mean) / sqrt(biased var + eps) * w + b."""
    out = []
    for part in h.chunk(groups):
        mean = part.mean(0)
        var = ((part - mean) ** 2).mean(0)
        out.append((part - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    return torch.cat(out)


def test_bn_groups_compute_batchnorm_per_group():
    recipe = make_moco(MoCoConfig(queue_size=16, bn_groups=2), bn=True)
    with torch.no_grad():  # make the BN affine and the key encoder non-trivial
        recipe.backbone.bn.weight.uniform_(0.5, 2.0)
        recipe.backbone.bn.bias.uniform_(-1.0, 1.0)
        recipe.after_step(0.0)
    x0, x1 = views(3)
    progress = 0.25

    def manual(backbone, head, x, groups):
        return F.normalize(head(manual_group_bn(backbone.fc(x.flatten(1)), groups, backbone.bn)), dim=1)

    with torch.no_grad():
        # queries: BN per group of 4 in the original order
        torch.testing.assert_close(recipe._encode(recipe.backbone, recipe.head, x0),
                                   manual(recipe.backbone, recipe.head, x0, 2))
        # keys: the batch permuted with the step's seed (the recipe's rule), BN per group, then put back
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(int(progress * 2**31)))
        expect = torch.empty(8, recipe.cfg.dim, dtype=torch.float64)
        expect[perm] = manual(recipe.key_backbone, recipe.key_head, x1[perm], 2)
        got = recipe.keys(x1, progress)
        torch.testing.assert_close(got, expect)
        # and this differs from BN over the whole batch, so the groups are not a no-op
        assert not torch.allclose(got, manual(recipe.key_backbone, recipe.key_head, x1, 1), atol=1e-3)


# ---- two gloo workers against one process --------------------------------------------------------------------

STEPS = 2


def _moco_steps(rank, world, xs):
    """Two MoCo v2 steps on this rank's slice of each global batch, gradients averaged as DDP does."""
    recipe = make_moco(MoCoV2Config(queue_size=16, momentum=0.9, hidden=7, dim=5))
    opt = torch.optim.SGD([p for p in recipe.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    n = xs[0][0].shape[0] // world
    out = []
    for s in range(STEPS):
        local = [v[rank * n:(rank + 1) * n] for v in xs[s]]
        res = recipe(local, {}, (s + 1) / 10)
        opt.zero_grad()
        res.loss.backward()
        grads = {k: dist.all_reduce(p.grad.clone(), "mean") for k, p in recipe.named_parameters() if p.requires_grad}
        for k, p in recipe.named_parameters():
            if p.requires_grad:
                p.grad.copy_(grads[k])
        opt.step()
        recipe.after_step((s + 1) / 10)
        out.append({"loss": res.loss.item(), "grads": grads, "queue": recipe.queue.clone(),
                    "ptr": int(recipe.queue_ptr), "key_fc": recipe.key_backbone.fc.weight.clone()})
    return out


def _moco_worker(rank, world, xs, x):
    torch.set_num_threads(1)
    n = x.shape[0] // world
    shuffled, inv = dist.shuffle_across(x[rank * n:(rank + 1) * n], 123)
    return _moco_steps(rank, world, xs), shuffled, dist.unshuffle(shuffled, inv)


def test_two_workers_equal_one_process(gloo):
    xs = [views(10 + s) for s in range(STEPS)]
    x = torch.arange(8.0).view(8, 1) * 10
    single = _moco_steps(0, 1, xs)
    results = gloo(_moco_worker, 2, xs, x)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(123))
    for rank, (steps, shuffled, back) in enumerate(results):
        torch.testing.assert_close(shuffled, x[perm][rank * 4:(rank + 1) * 4])  # a slice of the global permutation
        torch.testing.assert_close(back, x[rank * 4:(rank + 1) * 4])             # unshuffle undoes it
    for s, ref in enumerate(single):
        assert np.mean([r[0][s]["loss"] for r in results]) == pytest.approx(ref["loss"], rel=1e-10)
        for steps, _, _ in results:
            for k, g in ref["grads"].items():
                torch.testing.assert_close(steps[s]["grads"][k], g, msg=f"step {s}: gradient of {k}")
            # the all-gathered keys make every replica's queue the one process's queue
            torch.testing.assert_close(steps[s]["queue"], ref["queue"], msg=f"step {s}: queue")
            assert steps[s]["ptr"] == ref["ptr"] == (8 * (s + 1)) % 16
            torch.testing.assert_close(steps[s]["key_fc"], ref["key_fc"])
