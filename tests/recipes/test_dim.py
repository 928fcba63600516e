"""Deep InfoMax: the three MI estimators against plain float64 loops, the recipe's local and global losses against a
pair-by-pair reference, the prior discriminator's ascent, local feature maps of every backbone family, and a
2-process gloo run equal to one process on the concatenated batch."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sslab.config import ConfigError
from sslab.recipes.backbones import ModelConfig, SmallCNN, build_backbone, forward_with_local
from sslab.recipes.dim import DIM, DIMConfig, mi_loss
from sslab.recipes.protocol import RecipeContext

SIZE = 12


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def reference(scores: np.ndarray, estimator: str) -> float:
    """Minus the bound, one pair at a time: scores[j, k, i] = T(location i of image k, y_j); j == k are positives."""
    n, _, locs = scores.shape
    pos = [scores[j, j, i] for j in range(n) for i in range(locs)]
    neg = [scores[j, k, i] for j in range(n) for k in range(n) if k != j for i in range(locs)]
    if estimator == "jsd":   # I_JSD = E_pos[-sp(-T)] - E_neg[sp(T)]
        return -(np.mean([-softplus(-t) for t in pos]) - np.mean([softplus(t) for t in neg]))
    if estimator == "dv":    # I_DV = E_pos[T] - log E_neg[exp T]
        return -(np.mean(pos) - math.log(np.mean([math.exp(t) for t in neg])))
    # InfoNCE: each positive (j, i) against every location of every other image, scored with y_j
    total = 0.0
    for j in range(n):
        others = [scores[j, k, i] for k in range(n) if k != j for i in range(locs)]
        for i in range(locs):
            t = scores[j, j, i]
            total += -(t - math.log(math.exp(t) + sum(math.exp(o) for o in others)))
    return total / (n * locs)


@pytest.mark.parametrize("estimator", ["jsd", "infonce", "dv"])
@pytest.mark.parametrize("n,locs", [(2, 1), (5, 1), (4, 9), (7, 3)])
def test_estimators_match_reference(estimator, n, locs):
    scores = torch.randn(n, n, locs, generator=torch.Generator().manual_seed(n * locs), dtype=torch.float64) * 3
    assert mi_loss(scores, estimator).item() == pytest.approx(reference(scores.numpy(), estimator), rel=1e-10)


@pytest.mark.parametrize("estimator", ["jsd", "infonce", "dv"])
def test_estimators_reward_separated_pairs(estimator):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 6, 4, generator=g, dtype=torch.float64)
    separated = noise + 5 * torch.eye(6, dtype=torch.float64)[:, :, None]   # positives score far above negatives
    assert mi_loss(separated, estimator) < mi_loss(noise, estimator) - 0.5


def flat_cnn(in_chans, width=4):
    """The small CNN without BatchNorm: outputs per sample do not depend on the batch (distributed tests)."""
    net = SmallCNN(in_chans, width)
    for i in (1, 4, 7, 10):
        net.body[i] = nn.Identity()
    return net


def make(seed=0, flat=True, **cfg):
    torch.manual_seed(seed)
    build = (lambda in_chans=1: flat_cnn(in_chans)) if flat else \
        (lambda in_chans=1: build_backbone(ModelConfig(width=4), in_chans, SIZE))
    ctx = RecipeContext(make_backbone=build, num_train=32, channels=1, image_size=SIZE, epochs=2, batch_size=8)
    return DIM(DIMConfig(**{"mi_dim": 16, "dim": 8, **cfg}), ctx).double()


def recipe_reference(r: DIM, x: torch.Tensor, estimator: str, alpha: float, beta: float) -> torch.Tensor:
    """The recipe's MI loss built pair by pair from its own parts (differentiable, for the gradient check)."""
    feats, local = forward_with_local(r.backbone, x)
    y = r.head(feats)
    n, total = len(x), torch.zeros((), dtype=torch.float64)
    if beta:
        u, v = r.local_y(y), r.local_map(local)                  # [n, D], [n, D, h, w]
        locs = v.shape[2] * v.shape[3]
        scores = torch.stack([torch.stack([torch.stack([u[j] @ v[k, :, i // v.shape[3], i % v.shape[3]]
                                                        for i in range(locs)]) for k in range(n)]) for j in range(n)])
        total = total + beta * mi_loss(scores, estimator)
    if alpha:
        # concat-and-convolve, literally: the MLP on the concatenation [convolved M_k flattened ; y_j]
        conv_flat = r.global_d.convolve(local)
        hidden = r.global_d.from_map.out_features
        first = nn.Linear(conv_flat.shape[1] + y.shape[1], hidden).double()
        with torch.no_grad():
            first.weight.copy_(torch.cat([r.global_d.from_map.weight, r.global_d.from_y.weight], 1))
            first.bias.copy_(r.global_d.from_map.bias)
        scores = torch.stack([torch.stack([r.global_d.rest(first(torch.cat([conv_flat[k], y[j]])))
                                           for k in range(n)]) for j in range(n)])
        total = total + alpha * mi_loss(scores, estimator)
    return total


@pytest.mark.parametrize("estimator", ["jsd", "infonce", "dv"])
def test_recipe_loss_matches_pairwise_reference(estimator):
    r = make(alpha=0.5, beta=1.0, gamma=0.0, estimator=estimator)
    x = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = r([x], {}, 0.5).loss
    want = recipe_reference(r, x, estimator, 0.5, 1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_prior_discriminator_ascends_while_the_encoder_descends():
    r = make(gamma=0.5)
    x = torch.randn(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(7)
    out = r([x], {}, 0.5)
    out.loss.backward()
    r.before_optimizer_step(0.5)
    got_d = [p.grad.clone() for p in r.prior_d.parameters()]
    got_head = r.head.weight.grad.clone()

    r.zero_grad()
    torch.manual_seed(7)                                   # the same prior samples
    out = r([x], {}, 0.5)
    value = out.metrics["prior_value"]
    mi = out.loss.detach() - 0.5 * value
    assert value.item() < 0 and mi.item() > 0               # log-likelihoods are negative; -MI bound + constants
    y = r.head(r.backbone(x))
    fake, real = torch.sigmoid(y), torch.rand(6, 8, dtype=torch.float64)
    torch.manual_seed(7)
    real = torch.rand_like(fake)
    v = torch.log(torch.sigmoid(r.prior_d(real))).mean() + torch.log(1 - torch.sigmoid(r.prior_d(fake))).mean()
    assert v.item() == pytest.approx(value.item(), rel=1e-9)
    want_d = torch.autograd.grad(-0.5 * v, list(r.prior_d.parameters()), retain_graph=True)  # D maximises v
    for g, w in zip(got_d, want_d):
        torch.testing.assert_close(g, w)
    # the encoder side: the MI loss plus +gamma * v (minimised)
    r.zero_grad()
    torch.manual_seed(7)
    again = r([x], {}, 0.5).loss
    again.backward()
    torch.testing.assert_close(r.head.weight.grad, got_head)


def test_prior_discriminator_has_its_own_optimizer_group():
    from sslab.platform.optim import build_optimizer

    r = make(gamma=0.1, prior_lr_scale=0.5)
    opt = build_optimizer("adamw", r, 1e-3, 0.9, 0.05, r.optimizer_groups())
    named = [g for g in opt.param_groups if g.get("name") == "prior_d"]
    assert len(named) == 1 and named[0]["weight_decay"] == 0.0 and named[0]["lr_scale"] == 0.5
    assert {id(p) for p in named[0]["params"]} == {id(p) for p in r.prior_d.parameters()}
    others = {id(p) for g in opt.param_groups if g is not named[0] for p in g["params"]}
    assert not others & {id(p) for p in r.prior_d.parameters()}
    assert make(gamma=0.0).optimizer_groups() == {}


@pytest.mark.parametrize("name,size,grid", [("small_cnn", 28, 7), ("resnet18", 32, 8), ("vit_tiny", 32, 8)])
def test_local_feature_map_of_each_backbone(name, size, grid):
    net = build_backbone(ModelConfig(name=name, width=4, patch_size=4, depth=2), 3, size)
    feats, local = forward_with_local(net, torch.randn(2, 3, size, size))
    assert feats.shape == (2, net.feat_dim)
    assert local.dim() == 4 and local.shape[0] == 2 and local.shape[-2:] == (grid, grid)
    assert not net._forward_hooks and not any(m._forward_hooks for m in net.modules())  # nothing left behind


def test_check_spec_refuses_nothing_to_maximise():
    from sslab.datasets.shards import Manifest  # noqa: F401  (the manifest only needs .channels here)
    from types import SimpleNamespace

    spec = SimpleNamespace(model=ModelConfig(), recipe=DIMConfig(alpha=0.0, beta=0.0))
    with pytest.raises(ConfigError, match="nothing to maximise"):
        DIM.check_spec(spec, SimpleNamespace(channels=1))
    DIM.check_spec(SimpleNamespace(model=ModelConfig(), recipe=DIMConfig()), SimpleNamespace(channels=1))


def _dist_dim(rank, world, x_all, estimator, state):
    r = make(alpha=0.5, beta=1.0, gamma=0.0, estimator=estimator)
    r.load_state_dict(state)
    n = x_all.shape[0] // world
    loss = r([x_all[rank * n:(rank + 1) * n]], {}, 0.5).loss
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in r.named_parameters()}


@pytest.mark.parametrize("estimator", ["jsd", "infonce", "dv"])
def test_two_workers_equal_one_process(gloo, estimator):
    r = make(alpha=0.5, beta=1.0, gamma=0.0, estimator=estimator)
    x = torch.randn(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    single = r([x], {}, 0.5).loss
    single.backward()
    results = gloo(_dist_dim, 2, x, estimator, r.state_dict())
    for loss, _ in results:                      # every worker computes the whole batch's loss
        assert loss == pytest.approx(single.item(), rel=1e-10)
    for k, p in r.named_parameters():            # data-parallel averaging of the workers' gradients
        torch.testing.assert_close((results[0][1][k] + results[1][1][k]) / 2, p.grad)
