"""SwAV: Sinkhorn-Knopp against a plain loop, its marginals, its distributed sums against one process; the swapped
prediction against a loop; the recipe's loss (with and without the queue), frozen and normalised prototypes."""
import math

import numpy as np
import pytest
import torch

from sslab.config import ConfigError
from sslab.platform.spec import make_spec
from sslab.recipes.backbones import ModelConfig, build_backbone
from sslab.recipes.losses import multi_crop_cross_entropy, sinkhorn
from sslab.recipes.protocol import RecipeContext
from sslab.recipes.swav import SwAV, SwAVConfig

SIZE, LOCAL = 12, 6


def sinkhorn_reference(scores, eps, iters):
    """Caron et al. 2020, appendix A.1, with loops in float64: Q = exp(scores/eps)^T [K, B]; rows to 1/K, columns
    to 1/B, `iters` times; codes = B * Q^T."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(k)]
    for _ in range(iters):
        for j in range(k):
            s = sum(q[j])
            q[j] = [x / s / k for x in q[j]]
        for i in range(b):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] /= s * b
    return np.array(q).T * b


def cross_entropy_reference(logits, targets, t):
    """Swapped prediction over crops: every crop v != i predicts target i; mean over images and pairs."""
    total, pairs = 0.0, 0
    for i, q in enumerate(targets):
        for v, s in enumerate(logits):
            if v == i:
                continue
            pairs += 1
            for row in range(len(s)):
                logz = math.log(sum(math.exp(x / t) for x in s[row]))
                total -= sum(q[row][j] * (s[row][j] / t - logz) for j in range(len(q[row]))) / len(s)
    return total / pairs


@pytest.mark.parametrize("b,k,eps,iters", [(4, 3, 0.05, 3), (7, 10, 0.1, 1), (16, 5, 0.5, 5)])
def test_sinkhorn_matches_reference(b, k, eps, iters):
    scores = torch.rand(b, k, generator=torch.Generator().manual_seed(b), dtype=torch.float64) * 2 - 1
    got = sinkhorn(scores, eps, iters).numpy()
    np.testing.assert_allclose(got, sinkhorn_reference(scores.tolist(), eps, iters), rtol=1e-9)


def test_sinkhorn_marginals():
    scores = torch.rand(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    codes = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(codes.sum(1), torch.ones(12, dtype=torch.float64))  # each image: a distribution
    codes = sinkhorn(scores, 0.05, 2000)      # converged: each prototype gets an equal share of the batch
    torch.testing.assert_close(codes.sum(0), torch.full((4,), 12 / 4, dtype=torch.float64), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(codes.sum(1), torch.ones(12, dtype=torch.float64))


def _dist_codes(rank, world, scores, eps, iters):
    n = scores.shape[0] // world
    return sinkhorn(scores[rank * n:(rank + 1) * n], eps, iters)


def test_sinkhorn_sums_span_workers(gloo):
    scores = torch.rand(10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    scores[:5] += 0.5  # the two workers' halves differ: local sums alone would give other codes
    parts = gloo(_dist_codes, 2, scores, 0.05, 3)
    torch.testing.assert_close(torch.cat(parts), sinkhorn(scores, 0.05, 3), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(parts[0], sinkhorn(scores[:5], 0.05, 3))


@pytest.mark.parametrize("crops,t", [(2, 0.1), (4, 0.5)])
def test_swapped_prediction_matches_reference(crops, t):
    g = torch.Generator().manual_seed(crops)
    logits = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(crops)]
    targets = [torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), 1) for _ in range(2)]
    got = multi_crop_cross_entropy(logits, targets, t).item()
    assert got == pytest.approx(cross_entropy_reference([x.tolist() for x in logits],
                                                        [x.tolist() for x in targets], t), rel=1e-10)


def make(epochs=2, **cfg):
    torch.manual_seed(0)
    ctx = RecipeContext(make_backbone=lambda in_chans=1: build_backbone(ModelConfig(width=4), in_chans, SIZE),
                        num_train=32, channels=1, image_size=SIZE, epochs=epochs, batch_size=4)
    return SwAV(SwAVConfig(**{"hidden": 16, "dim": 8, "prototypes": 6, "n_local": 2, **cfg}), ctx).double()


def crops(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, s, s, generator=g, dtype=torch.float64) for s in (SIZE, SIZE, LOCAL, LOCAL)]


def reference_loss(r, views, queue=None):
    """Scores from the recipe's own modules; codes and loss from the loop references above."""
    n = views[0].shape[0]
    with torch.no_grad():
        feats = torch.cat([r.backbone(torch.cat(views[:2])), r.backbone(torch.cat(views[2:]))])
        z = torch.nn.functional.normalize(r.projector(feats), dim=1)
        scores = r.prototypes(z)
    codes = []
    for i in range(2):
        s = scores[i * n:(i + 1) * n]
        if queue is not None:  # earlier features scored against today's prototypes, in front of the batch
            s = torch.cat([queue[i] @ r.prototypes.weight.T, s])
        codes.append(sinkhorn_reference(s.tolist(), 0.05, 3)[-n:].tolist())
    return cross_entropy_reference([x.tolist() for x in scores.split(n)], codes, 0.1)


def test_loss_matches_reference_and_prototypes_stay_normalised():
    r = make()
    views = crops(0)
    out = r(views, {}, 0.6)
    assert out.loss.item() == pytest.approx(reference_loss(r, views), rel=1e-9)
    out.loss.backward()
    r.before_optimizer_step(0.6)
    assert r.prototypes.weight.grad is not None
    with torch.no_grad():
        r.prototypes.weight.mul_(3.0)  # as if an optimizer step moved them off the sphere
    r.after_step(0.6)
    torch.testing.assert_close(r.prototypes.weight.norm(dim=1), torch.ones(6, dtype=torch.float64))


def test_prototypes_frozen_in_the_first_epoch():
    r = make(epochs=4)  # epoch 1 = progress below 0.25
    for progress, frozen in ((0.0, True), (0.24, True), (0.25, False), (0.9, False)):
        r.zero_grad()
        r(crops(1), {}, progress).loss.backward()
        r.before_optimizer_step(progress)
        assert (r.prototypes.weight.grad is None) == frozen, progress
        assert r.projector[0].weight.grad is not None


def test_queue_fills_after_its_start_epoch_and_joins_the_codes():
    r = make(queue_length=8, queue_start_epoch=1.0)  # 2 batches of 4; on from progress 0.5 (epoch 1 of 2)
    views = [crops(s) for s in range(5)]
    out = r(views[0], {}, 0.25)
    r.after_step(0.25)
    assert int(r.queue_filled) == 0 and not r.queue.any()  # before its start epoch the queue stays empty
    embeddings = []
    for s, progress in ((1, 0.5), (2, 0.6)):
        out = r(views[s], {}, progress)
        assert out.metrics["queue_used"] == 0.0  # not full yet: codes from the batch alone
        assert out.loss.item() == pytest.approx(reference_loss(r, views[s]), rel=1e-9)
        embeddings.append(out.embedding)
        r.after_step(progress)
    assert int(r.queue_filled) == 8
    torch.testing.assert_close(r.queue[0, :4], embeddings[1])  # newest first
    torch.testing.assert_close(r.queue[0, 4:], embeddings[0])
    queue = r.queue.clone()
    out = r(views[3], {}, 0.7)
    assert out.metrics["queue_used"] == 1.0
    assert out.loss.item() == pytest.approx(reference_loss(r, views[3], queue), rel=1e-9)
    assert out.loss.item() != pytest.approx(reference_loss(r, views[3]), rel=1e-6)


def test_queue_length_must_be_a_multiple_of_the_batch():
    spec = make_spec("swav", {"data.path": "x", "engine.batch_size": 64, "recipe.queue_length": 100})
    with pytest.raises(ConfigError, match="recipe.queue_length=100"):
        SwAV.check_spec(spec, None)
    SwAV.check_spec(make_spec("swav", {"data.path": "x", "engine.batch_size": 64, "recipe.queue_length": 3840}), None)
