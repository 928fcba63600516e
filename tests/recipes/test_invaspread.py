"""InvaSpread: the invariance-and-spreading loss (value and gradients, weights held constant) against a plain float64
loop, and 2 gloo workers equal to one process on the global batch."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslab.recipes.invaspread import InvaSpread, InvaSpreadConfig, invaspread_loss
from tests.recipes.test_instdisc import tiny_ctx


def reference_loss(z1, z2, tau):
    """Ye et al. 2019 over 2N samples, per anchor in float64. Each anchor x (row a of [z1; z2]) has its other view as
    positive; every other row but itself is a class of the denominator; the 2(N-1) rows that are neither x nor its
    positive are the negatives, each contributing log(1 - P). The class weights are constants (`detach`)."""
    z = torch.cat([z1, z2]).double()
    w = z.detach()
    two_n = z.shape[0]
    total = 0.0
    for a in range(two_n):
        pos = (a + two_n // 2) % two_n
        e = {j: torch.exp(z[a] @ w[j] / tau) for j in range(two_n) if j != a}
        denom = sum(e.values())
        total = total - torch.log(e[pos] / denom)
        negatives = [j for j in e if j != pos]
        assert len(negatives) == two_n - 2
        for j in negatives:
            total = total - torch.log(1 - e[j] / denom)
    return total / two_n


@pytest.mark.parametrize("n,tau", [(2, 0.1), (5, 0.1), (4, 0.5)])
def test_loss_and_gradients_match_reference(n, tau):
    g = torch.Generator().manual_seed(n)
    z1, z2 = (F.normalize(torch.randn(n, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
              for _ in range(2))
    loss = invaspread_loss(z1, z2, tau)
    ref = reference_loss(z1, z2, tau)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    got = torch.autograd.grad(loss, (z1, z2))
    want = torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_loss_is_low_when_views_agree_and_instances_spread():
    eye = torch.eye(4, dtype=torch.float64)
    spread = invaspread_loss(eye, eye, 0.1).item()           # views identical, instances orthogonal
    assert spread == pytest.approx(reference_loss(eye, eye, 0.1).item()) and spread < 1e-3
    assert invaspread_loss(eye, eye.roll(1, 0), 0.1).item() > 5   # each view matches another image's
    assert math.isfinite(invaspread_loss(torch.ones(3, 4) / 2, torch.ones(3, 4) / 2, 0.1).item())  # collapsed


def _recipe():
    torch.manual_seed(0)
    return InvaSpread(InvaSpreadConfig(), tiny_ctx())


def _worker(rank, world, v1, v2):
    from sslab import dist

    torch.set_num_threads(1)
    recipe = _recipe()
    n = v1.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    out = recipe([v1[sl], v2[sl]], {"index": torch.arange(n), "label": torch.arange(n)}, 0.0)
    out.loss.backward()
    for p in recipe.parameters():
        dist.all_reduce(p.grad, "mean")                      # what data-parallel training does
    return out.loss.item(), {k: p.grad for k, p in recipe.named_parameters()}


def test_two_workers_equal_one_process(gloo):
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    loss, grads = _worker(0, 1, v1, v2)
    recipe = _recipe()                                       # the single-process loss is the plain reference's
    z = F.normalize(recipe.head(recipe.backbone(torch.cat([v1, v2]))), dim=1)
    assert loss == pytest.approx(reference_loss(z[:8], z[8:], 0.1).item(), rel=1e-5)
    multi = gloo(_worker, 2, v1, v2)
    assert sum(m[0] for m in multi) / 2 == pytest.approx(loss, rel=1e-5)
    for _, mg in multi:
        for k, grad in grads.items():
            assert torch.allclose(mg[k], grad, rtol=1e-4, atol=1e-6), k
