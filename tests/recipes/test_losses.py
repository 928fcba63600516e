"""NT-Xent against a plain loop over the paper's definition, and its distributed form against one process."""
import math

import numpy as np
import pytest
import torch

from sslab.recipes.losses import nt_xent


def nt_xent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """Chen et al. 2020, Algorithm 1, written out with loops in float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2                       # the other view of image i
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (5, 8, 0.1), (16, 4, 1.0), (7, 32, 0.07)])
def test_nt_xent_matches_reference(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    got = nt_xent(z1.double(), z2.double(), t).item()
    assert got == pytest.approx(nt_xent_reference(z1.numpy(), z2.numpy(), t), rel=1e-9)


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16)
    aligned = nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.2).item()
    shuffled = nt_xent(z, z[torch.randperm(8)], 0.2).item()
    assert aligned < shuffled


def _dist_nt_xent(rank, world, z1_all, z2_all, t):
    """Each rank holds its slice of the global batch; return its loss and the gradient on its slice."""
    n = z1_all.shape[0] // world
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(z1, z2, t)
    loss.backward()
    return loss.item(), z1.grad, z2.grad


@pytest.mark.parametrize("world", [2])
def test_gathered_nt_xent_equals_single_process(gloo, world):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    single = nt_xent(a, b, 0.3)
    single.backward()
    results = gloo(_dist_nt_xent, world, z1, z2, 0.3)
    # the single-process loss is the mean of the ranks' losses ...
    assert np.mean([r[0] for r in results]) == pytest.approx(single.item(), rel=1e-10)
    # ... and with data-parallel averaging (1/world) the gradient on each sample equals the single-process one
    g1 = torch.cat([r[1] for r in results]) / world
    g2 = torch.cat([r[2] for r in results]) / world
    torch.testing.assert_close(g1, a.grad)
    torch.testing.assert_close(g2, b.grad)
