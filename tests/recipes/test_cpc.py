"""CPC: patch grid, causal context, the grid InfoNCE against a plain loop, geometry checks, and two gloo workers
against one process on the concatenated batch."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sslab.config import ConfigError
from sslab.platform.spec import make_spec
from sslab.recipes.cpc import CPC, CPCConfig, MaskedContext, PatchEncoder, grid_geometry, grid_infonce
from sslab.recipes.protocol import RecipeContext


def cpc_reference(pred, z_all, rows, neg_idx):
    """Hénaff et al. 2020 eq. (1)-(2) written out: for every prediction (b, k, i, j) the positive is the patch
    (i+k, j) of the same image; the candidates are the positive plus the negative rows (all rows of the global
    batch, or the sampled ones) except the positive itself. float64 loops; returns (mean loss, accuracy)."""
    pred, z_all = pred.double().numpy(), z_all.double().numpy()
    rows = rows.numpy()
    cands = range(len(z_all)) if neg_idx is None else neg_idx.tolist()
    b, k_max, _, g, _ = pred.shape
    losses, hits = [], []
    for bi in range(b):
        for k in range(1, k_max + 1):
            for i in range(g - k):
                for j in range(g):
                    q = pred[bi, k - 1, :, i, j]
                    pos = rows[bi, i + k, j]
                    s_pos = float(q @ z_all[pos])
                    s_neg = [float(q @ z_all[m]) for m in cands if m != pos]
                    top = max([s_pos] + s_neg)
                    lse = top + math.log(sum(math.exp(s - top) for s in [s_pos] + s_neg))
                    losses.append(lse - s_pos)
                    hits.append(all(s_pos >= s for s in s_neg))
    return float(np.mean(losses)), float(np.mean(hits))


@pytest.mark.parametrize("b,k,g,f,offset,sampled", [(1, 1, 2, 3, 0, False), (2, 2, 4, 5, 0, False),
                                                    (3, 3, 5, 4, 45, False), (2, 2, 4, 6, 16, True)])
def test_grid_infonce_matches_reference(b, k, g, f, offset, sampled):
    gen = torch.Generator().manual_seed(b * 1000 + k * 100 + g)
    m = offset + b * g * g + 7                               # rows of other workers before and after ours
    pred, z_all = torch.randn(b, k, f, g, g, generator=gen), torch.randn(m, f, generator=gen)
    rows = (offset + torch.arange(b * g * g)).view(b, g, g)
    neg_idx = torch.randperm(m, generator=gen)[:m // 2] if sampled else None
    if sampled:  # make sure some sampled negatives are targets of ours, so their masking is exercised
        neg_idx = torch.unique(torch.cat([neg_idx, rows[:, 1:3, 0].reshape(-1)]))
    loss, acc = grid_infonce(pred.double(), z_all.double(), rows, neg_idx)
    ref_loss, ref_acc = cpc_reference(pred, z_all, rows, neg_idx)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9)
    assert acc.item() == pytest.approx(ref_acc)


def test_patches_are_the_overlapping_slices():
    x = torch.randn(2, 3, 16, 16)
    seen = []
    enc = PatchEncoder(_Recorder(seen), patch=6, stride=2)
    grid = enc.grid(x)
    assert grid.shape == (2, 4 * 3 * 6 * 6, 6, 6)              # 6x6 grid; the recorder returns flattened pixels
    patches = seen[0].view(2, 6, 6, 3, 6, 6)
    for b, i, j in [(0, 0, 0), (1, 5, 5), (0, 2, 4), (1, 4, 1)]:
        assert torch.equal(patches[b, i, j], x[b, :, 2 * i:2 * i + 6, 2 * j:2 * j + 6])
        assert torch.equal(grid[b, :, i, j], x[b, :, 2 * i:2 * i + 6, 2 * j:2 * j + 6].reshape(-1).repeat(4))
    assert torch.allclose(enc(x), grid.mean(dim=(2, 3)))     # the kNN encoder pools the grid


class _Recorder(nn.Module):
    feat_dim = 4 * 3 * 6 * 6

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, p):
        self.seen.append(p)
        return p.flatten(1).repeat(1, 4)


@pytest.mark.parametrize("layers", [1, 3])
def test_context_sees_no_row_below(layers):
    torch.manual_seed(0)
    ctx = MaskedContext(16, layers)
    for conv in ctx.modules():                                # non-zero biases: nothing hides behind zeros
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.bias)
    z = torch.randn(2, 16, 6, 6)
    base = ctx(z)
    for r in range(6):
        z2 = z.clone()
        z2[:, :, r] += torch.randn(2, 16, 6)                  # perturb row r only
        out = ctx(z2)
        assert torch.equal(out[:, :, :r], base[:, :, :r]), f"row {r} leaked into the rows above it"
        assert not torch.allclose(out[:, :, r], base[:, :, r])  # the context does see its own row
    # and it sees far enough up: row 5 depends on row 5 - 2*layers (or row 0)
    z2 = z.clone()
    z2[:, :, max(0, 5 - 2 * layers)] += 1.0
    assert not torch.allclose(ctx(z2)[:, :, 5], base[:, :, 5])


@pytest.mark.parametrize("size,expect", [(16, (4, 2, 7)), (28, (8, 4, 6)), (32, (8, 4, 7)), (64, (16, 8, 7)),
                                         (256, (64, 32, 7)), (30, (10, 4, 6))])
def test_auto_geometry_tiles(size, expect):
    patch, stride, grid = grid_geometry(CPCConfig(), size)
    assert (patch, stride, grid) == expect and (grid - 1) * stride + patch == size


def test_check_spec_rejects_bad_geometry_and_vit():
    manifest = SimpleNamespace(image_size=(28, 28))
    with pytest.raises(ConfigError, match=r"recipe.patch=8 with recipe.stride=6 does not tile 28 px"):
        CPC.check_spec(make_spec("cpc", {"data.path": "x", "recipe.patch": 8, "recipe.stride": 6}), manifest)
    with pytest.raises(ConfigError, match=r"recipe.steps=6 needs a grid of more than 6 rows"):
        CPC.check_spec(make_spec("cpc", {"data.path": "x", "recipe.steps": 6}), manifest)
    with pytest.raises(ConfigError, match="model.name=vit_tiny"):
        CPC.check_spec(make_spec("cpc", {"data.path": "x", "model.name": "vit_tiny"}), manifest)
    CPC.check_spec(make_spec("cpc", {"data.path": "x", "data.crop_size": 24, "recipe.patch": 8}), manifest)


class TinyPatchNet(nn.Module):
    """BN-free patch encoder, so two workers and one process compute the same function."""
    feat_dim = 8

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))

    def forward(self, x):
        return self.net(x).mean(dim=(2, 3))


def _run_cpc(images, directions):
    torch.manual_seed(0)
    ctx = RecipeContext(make_backbone=TinyPatchNet, num_train=16, channels=1, image_size=16, epochs=1, batch_size=8)
    model = CPC(CPCConfig(directions=directions, negatives=0, steps=2), ctx).double()
    out = model([images.double()], {}, 0.5)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _dist_cpc(rank, world, images, directions):
    n = images.shape[0] // world
    return _run_cpc(images[rank * n:(rank + 1) * n], directions)


def test_two_workers_equal_one_process(gloo):
    """Negatives from both workers (gather_with_grad), all four directions: the same loss and averaged gradients
    as one process on the 6 images; with worker-local negatives neither would match."""
    images = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    loss, grads = _run_cpc(images, 4)
    per_rank = gloo(_dist_cpc, 2, images, 4)
    # data-parallel training averages the workers' gradients; their mean loss is the global mean
    assert np.mean([r[0] for r in per_rank]) == pytest.approx(loss, rel=1e-10)
    assert grads
    for name, g in grads.items():
        avg = (per_rank[0][1][name] + per_rank[1][1][name]) / 2
        assert torch.allclose(avg, g, rtol=1e-8, atol=1e-10), name
