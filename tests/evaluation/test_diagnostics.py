"""Alignment, uniformity and effective rank against plain references and inputs whose answer is known."""
import math

import numpy as np
import pytest
import torch

from sslab.evaluation.diagnostics import alignment, effective_rank, sample_views, uniformity


def unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def alignment_reference(a, b):
    a, b = unit(a), unit(b)
    return float(np.mean([np.sum((a[i] - b[i]) ** 2) for i in range(len(a))]))


def uniformity_reference(z, t=2.0):
    z = unit(z)
    pots = [math.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(len(z)) for j in range(i + 1, len(z))]
    return math.log(sum(pots) / len(pots))


def effective_rank_reference(z):
    s = np.linalg.svd(unit(z), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize("n,d", [(5, 3), (40, 16), (64, 2)])
def test_metrics_match_plain_references(n, d):
    g = torch.Generator().manual_seed(n * d)
    a, b = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
    assert alignment(a, b) == pytest.approx(alignment_reference(a.numpy(), b.numpy()), rel=1e-9)
    assert uniformity(a) == pytest.approx(uniformity_reference(a.numpy()), rel=1e-9)
    assert effective_rank(a) == pytest.approx(effective_rank_reference(a.numpy()), rel=1e-6)


def test_identical_features():
    z = torch.randn(1, 8).expand(30, 8)  # every image on one point: perfectly aligned, no spread, rank 1
    assert alignment(z, z) == pytest.approx(0.0, abs=1e-12)
    assert uniformity(z) == pytest.approx(0.0, abs=1e-12)
    assert effective_rank(z) == pytest.approx(1.0, rel=1e-6)
    assert alignment(z, -z) == pytest.approx(4.0)  # opposite points on the sphere


def test_uniform_on_the_circle():
    # n points evenly spread on the circle: averaged over all n^2 ordered pairs the potential is E exp(-4 (1 - cos θ))
    # = e^-4 I0(4) (exact for evenly spaced points); the n self-pairs (potential 1) are left out of the mean
    n = 2000
    theta = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    z = torch.stack([theta.cos(), theta.sin()], 1)
    mean_all = math.exp(-4) * np.i0(4.0)
    expected = math.log((n * mean_all - 1) / (n - 1))
    assert uniformity(z) == pytest.approx(expected, rel=1e-9)
    clumped = z[:200]  # a tenth of the circle: far less uniform
    assert uniformity(clumped) > expected + 1
    assert effective_rank(z) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_features(k):
    # rows spread evenly over k orthogonal directions (rotated into 16 dims): exactly rank k
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k)))
    z = q[torch.arange(12 * k) % k]            # 12 copies of each of k orthonormal rows
    assert effective_rank(z * 5) == pytest.approx(k, rel=1e-6)


def test_sample_views_are_fixed_and_different():
    images = torch.randint(0, 256, (6, 1, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a1, a2 = sample_views(images, 16, seed=3)
    b1, b2 = sample_views(images, 16, seed=3)
    assert a1.shape == (6, 1, 16, 16) and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
