"""SimSiam: negative cosine against a loop, the recipe's loss and gradients against the paper's pseudocode with and
without the stop-gradient."""
import numpy as np
import pytest
import torch

from sslab.recipes.backbones import ModelConfig, build_backbone
from sslab.recipes.losses import negative_cosine
from sslab.recipes.protocol import RecipeContext
from sslab.recipes.simsiam import SimSiam, SimSiamConfig

SIZE = 12


def make(seed=0, **cfg):
    torch.manual_seed(seed)
    ctx = RecipeContext(make_backbone=lambda in_chans=1: build_backbone(ModelConfig(width=4), in_chans, SIZE),
                        num_train=32, channels=1, image_size=SIZE, epochs=2, batch_size=8)
    return SimSiam(SimSiamConfig(**{"dim": 16, "pred_hidden": 4, **cfg}), ctx)


@pytest.mark.parametrize("n,d", [(1, 2), (5, 8), (16, 3)])
def test_negative_cosine_matches_reference(n, d):
    g = torch.Generator().manual_seed(n + d)
    p, z = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    ref = -np.mean([p[i] @ z[i] / (np.linalg.norm(p[i]) * np.linalg.norm(z[i])) for i in range(n)])
    assert negative_cosine(p, z).item() == pytest.approx(ref, rel=1e-12)


def simsiam_reference(p1, p2, z1, z2, stop_gradient):
    """Chen & He 2021, Algorithm 1: L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, stopgrad(z)), one image
    at a time (in torch, so the gradient of the reference can be compared too)."""
    def d(p, z):
        z = z.detach() if stop_gradient else z
        return -sum(p[i] @ z[i] / (p[i].norm() * z[i].norm()) for i in range(len(p))) / len(p)
    return d(p1, z2) / 2 + d(p2, z1) / 2


def _grads(r):
    return [p.grad.clone() for p in r.backbone.parameters()]


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_loss_and_gradients_match_reference(stop_gradient):
    r = make(stop_gradient=stop_gradient).double()
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(6, 1, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]
    loss = r(views, {}, 0.2).loss
    loss.backward()
    got = _grads(r)

    def reference_grads(sg):
        r.zero_grad()
        z = r.projector(r.backbone(torch.cat(views)))  # train-mode BN: the same batch gives the same outputs
        p = r.predictor(z)
        ref = simsiam_reference(*p.split(6), *z.split(6), sg)
        ref.backward()
        return ref.item(), _grads(r)

    ref_loss, want = reference_grads(stop_gradient)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    _, other = reference_grads(not stop_gradient)  # the knob matters: the other choice gives other gradients
    assert any(not torch.allclose(a, b) for a, b in zip(got, other))


def test_output_bn_knob():
    assert isinstance(make().projector[-1], torch.nn.BatchNorm1d)
    assert isinstance(make(output_bn=False).projector[-1], torch.nn.Linear)
