"""SimCLR v2: the 3-layer head, encoder() = backbone + the head's first layer (checked against a hand computation),
the loss against a float64 NT-Xent loop, the ft_layers check, and 2 gloo workers equal to one process."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sslab.config import ConfigError
from sslab import dist
from sslab.platform.spec import make_spec
from sslab.recipes.protocol import RecipeContext
from sslab.recipes.simclrv2 import SimCLRv2, SimCLRv2Config

from conftest import FlatLinear

SIZE = 4


def make_v2(cfg=None, without_bn=False):
    torch.manual_seed(0)
    ctx = RecipeContext(make_backbone=lambda in_chans=1: FlatLinear(in_chans * SIZE * SIZE), num_train=64,
                        channels=1, image_size=SIZE, epochs=1, batch_size=8)
    recipe = SimCLRv2(cfg or SimCLRv2Config(dim=5), ctx)
    if without_bn:  # BN statistics are per worker here (SyncBN on GPU): compare the rest exactly
        for i, mod in enumerate(recipe.projector):
            if isinstance(mod, nn.BatchNorm1d):
                recipe.projector[i] = nn.Identity()
    return recipe.double()


def views(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]


def nt_xent_reference(z1, z2, t):
    """Chen et al. 2020, eq. 1, in float64 loops over the 2n anchors."""
    z = np.concatenate([np.asarray(z1), np.asarray(z2)]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        total -= z[i] @ z[j] / t - math.log(sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i))
    return total / n2


def test_three_layer_head_and_loss():
    recipe = make_v2()
    linears = [m for m in recipe.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 6), (6, 6), (6, 5)]  # hidden = backbone width
    x1, x2 = views(1)
    out = recipe([x1, x2], {}, 0.2)
    with torch.no_grad():  # same train-mode batch (both views together) as the recipe's single pass
        z = recipe.projector(recipe.backbone(torch.cat([x1, x2])))
    assert out.loss.item() == pytest.approx(nt_xent_reference(z[:8], z[8:], 0.1), rel=1e-10)


@pytest.mark.parametrize("ft_layers", [0, 1, 2])
def test_encoder_is_backbone_plus_first_head_layers(ft_layers):
    recipe = make_v2(SimCLRv2Config(dim=5, ft_layers=ft_layers))
    recipe(views(2), {}, 0.0)  # move the BN running statistics away from their initial values
    x = views(3)[0]
    enc = recipe.encoder().eval()
    with torch.no_grad():
        h = recipe.backbone.fc(x.flatten(1))
        for layer in range(ft_layers):  # Linear (no bias) -> BN with running statistics -> ReLU, by hand
            lin, bn = recipe.projector[3 * layer], recipe.projector[3 * layer + 1]
            h = h @ lin.weight.T
            h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            h = h.clamp_min(0)
        torch.testing.assert_close(enc(x), h)
    assert sum(1 for _ in enc.parameters()) == 2 + 3 * ft_layers  # fc weight + bias; per layer W, BN w, BN b


def test_ft_layers_must_leave_the_output_layer(tmp_path):
    with pytest.raises(ConfigError, match="ft_layers=3 must be below layers=3"):
        make_spec("simclrv2", {"data.path": str(tmp_path), "recipe.ft_layers": 3})


def _v2_step(rank, world, xs):
    recipe = make_v2(without_bn=True)
    n = xs[0].shape[0] // world
    out = recipe([v[rank * n:(rank + 1) * n] for v in xs], {}, 0.0)
    out.loss.backward()
    return out.loss.item(), {k: dist.all_reduce(p.grad.clone(), "mean") for k, p in recipe.named_parameters()}


def _v2_worker(rank, world, xs):
    torch.set_num_threads(1)
    return _v2_step(rank, world, xs)


def test_two_workers_equal_one_process(gloo):
    xs = views(5)
    loss, grads = _v2_step(0, 1, xs)
    results = gloo(_v2_worker, 2, xs)
    assert np.mean([r[0] for r in results]) == pytest.approx(loss, rel=1e-10)
    for _, g in results:
        for k, v in grads.items():
            torch.testing.assert_close(g[k], v, msg=f"gradient of {k}")
