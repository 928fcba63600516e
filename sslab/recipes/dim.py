"""Deep InfoMax (Hjelm et al., "Learning Deep Representations by Mutual Information Estimation and Maximization",
ICLR 2019).

The encoder's global feature y is trained to carry information about its own input, measured by a discriminator
T that scores (input, y) pairs: a pair from the same image is a positive, y with another image of the global
batch a negative, and a lower bound on the mutual information (section 3.1) is maximised:

    Jensen-Shannon  I >= E_pos[-softplus(-T)] - E_neg[softplus(T)]                  (eq. 4, the paper's default)
    InfoNCE         I >= E_pos[T - log(exp(T) + sum_neg exp(T'))]   per anchor y      (eq. 5)
    Donsker-Varadhan I >= E_pos[T] - log E_neg[exp(T)]                               (eq. 2)

"Global" MI pairs y with the whole local feature map M (concat-and-convolve discriminator); "local" MI pairs y with
every location of M (encode-and-dot-product) and averages over locations (section 3.2), which is what makes the
representation good for classification. Prior matching (section 3.3) trains a second discriminator D to tell
samples of a prior (uniform on [0, 1]^d) from sigmoid(y), while the encoder learns to fool it:
min_encoder max_D  E_prior[log D(v)] + E_data[log(1 - D(sigmoid(y)))]. Both sides come from one backward pass:
the loss carries that term with the encoder's sign and `before_optimizer_step` flips the sign of D's gradients.
(The method notes sslab started from describe the prior term as a KL divergence to a standard Gaussian, as in a VAE;
the paper, and sslab, match the prior adversarially.)

Negatives span the global batch: every worker gathers y and M's encodings from all workers (with gradient) and
computes the whole batch's loss, so a run on several workers equals one process holding the concatenated batch, for
all three estimators with one code path (Donsker-Varadhan's log-mean-exp is not a mean of per-worker terms; the
gather is the simple exact way, at the cost of every worker scoring every pair).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..config import ConfigError, knob
from ..datasets.views import ViewSet, ViewSpec
from .backbones import forward_with_local, local_layer
from .losses import _at_least_fp32 as fp32
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register

ESTIMATORS = ("jsd", "infonce", "dv")


@dataclass(frozen=True)
class DIMConfig:
    alpha: float = knob(0.0, "weight of global MI (y vs the whole feature map); the paper's classification "
                             "setting uses local MI only", min=0.0)
    beta: float = knob(1.0, "weight of local MI (y vs every location of the feature map)", min=0.0)
    gamma: float = knob(0.1, "weight of prior matching (sigmoid(y) vs uniform on [0, 1]); 0 = off", min=0.0)
    estimator: str = knob("jsd", "MI lower bound: jsd (Jensen-Shannon, softplus form), infonce or dv "
                                 "(Donsker-Varadhan)", choices=ESTIMATORS)
    dim: int = knob(64, "global feature y's dimension (the paper's 64)", min=1)
    mi_dim: int = knob(512, "width of the MI discriminators' encodings and hidden layers", min=1)
    prior_lr_scale: float = knob(1.0, "the prior discriminator's learning rate, relative to the run's", min=0.0,
                                 min_exclusive=True)


def dim_views(rc, data, size):
    # the paper maximises MI with the image itself: one view, no crop or colour change (a random flip only)
    return ViewSet((("view", ViewSpec(size, (1.0, 1.0), (1.0, 1.0), jitter_p=0.0, gray_p=0.0), 1),))


def mi_loss(scores: torch.Tensor, estimator: str) -> torch.Tensor:
    """Minus an MI lower bound from discriminator scores [N, N, L]: scores[j, k, l] = T(location l of image k, y_j).
    Pairs with j == k are positives, the rest negatives (L = 1 for global MI). InfoNCE contrasts each positive of
    y_j with all locations of the other images (the anchor is y)."""
    n, _, locs = scores.shape
    same = torch.eye(n, dtype=torch.bool, device=scores.device)
    pos = scores[same]                                                   # [N, L]
    neg = scores[~same]                                                  # [N*(N-1), L]
    if estimator == "jsd":
        return F.softplus(-pos).mean() + F.softplus(neg).mean()
    if estimator == "dv":
        return -pos.mean() + torch.logsumexp(neg.flatten(), 0) - math.log(neg.numel())
    if estimator == "infonce":
        neg_lse = torch.logsumexp(neg.view(n, (n - 1) * locs), dim=1, keepdim=True)  # [N, 1]: y_j's negatives
        return (torch.logaddexp(pos, neg_lse) - pos).mean()
    raise ValueError(f"unknown MI estimator {estimator!r}; one of {ESTIMATORS}")


class Encode(nn.Module):
    """Two layers with a linear shortcut: 1x1 convolutions over a feature map, or linear layers over a vector."""

    def __init__(self, in_dim: int, out_dim: int, conv: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.body = nn.Sequential(layer(in_dim, out_dim), nn.ReLU(inplace=True), layer(out_dim, out_dim))
        self.shortcut = layer(in_dim, out_dim)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class GlobalDiscriminator(nn.Module):
    """Concat-and-convolve: M through two 3x3 convolutions, flattened, concatenated with y, then an MLP to one score.
    Scoring every (M_k, y_j) pair of the batch splits the first linear layer over the concatenation,
    W [m; y] = W_m m + W_y y, so the [N, N] pairs cost one broadcast add, not N^2 concatenations."""

    def __init__(self, channels: int, side: int, dim: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 64, 3), nn.ReLU(inplace=True), nn.Conv2d(64, 32, 3))
        flat = 32 * (max(side, 5) - 4) ** 2
        self.from_map, self.from_y = nn.Linear(flat, hidden), nn.Linear(dim, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, 1))

    def convolve(self, local: torch.Tensor) -> torch.Tensor:
        if local.shape[-1] < 5:                               # too small for two 3x3 convolutions: upsample
            local = F.interpolate(local, size=5, mode="nearest")
        return self.conv(local).flatten(1)

    def encode_map(self, local: torch.Tensor) -> torch.Tensor:
        return self.from_map(self.convolve(local))             # [n, hidden]

    def scores(self, maps: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """maps [N, hidden] (encode_map), ys [N, dim] -> [N(y), N(map), 1]."""
        return self.rest(self.from_y(ys)[:, None] + maps[None])


@register("dim", config=DIMConfig, views=dim_views, engine={"optimizer": "adamw", "base_lr": 1e-4,
                                                            "weight_decay": 0.0})
class DIM(nn.Module, Recipe):
    """Deep InfoMax: maximise MI between the global feature and local features (JSD, InfoNCE or DV), prior matching."""

    def __init__(self, cfg: DIMConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        was = self.backbone.training
        with torch.no_grad():                 # the local map's shape, from a probe image
            _, local = forward_with_local(self.backbone.eval(), torch.zeros(2, ctx.channels, ctx.image_size,
                                                                            ctx.image_size))
        self.backbone.train(was)
        channels, side = local.shape[1], local.shape[-1]
        self.head = nn.Linear(self.backbone.feat_dim, cfg.dim)          # y: the global feature
        self.local_map = Encode(channels, cfg.mi_dim, conv=True) if cfg.beta else None
        self.local_y = Encode(cfg.dim, cfg.mi_dim, conv=False) if cfg.beta else None
        self.global_d = GlobalDiscriminator(channels, side, cfg.dim, cfg.mi_dim) if cfg.alpha else None
        self.prior_d = nn.Sequential(nn.Linear(cfg.dim, cfg.mi_dim), nn.ReLU(inplace=True),
                                     nn.Linear(cfg.mi_dim, cfg.mi_dim // 4 or 1), nn.ReLU(inplace=True),
                                     nn.Linear(cfg.mi_dim // 4 or 1, 1)) if cfg.gamma else None

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        feats, local = forward_with_local(self.backbone, views[0])
        y = self.head(feats)
        metrics, loss = {}, y.new_zeros(())
        if self.cfg.beta:
            ys = fp32(dist.gather_with_grad(self.local_y(y)))                         # [N, D]
            ms = fp32(dist.gather_with_grad(self.local_map(local).flatten(2)))        # [N, D, L]
            local_mi = mi_loss(torch.einsum("jd,kdl->jkl", ys, ms), self.cfg.estimator)
            loss = loss + self.cfg.beta * local_mi
            metrics["local_mi_loss"] = local_mi.detach()
        if self.cfg.alpha:
            ys = fp32(dist.gather_with_grad(y))
            maps = fp32(dist.gather_with_grad(self.global_d.encode_map(local)))
            global_mi = mi_loss(self.global_d.scores(maps, ys), self.cfg.estimator)
            loss = loss + self.cfg.alpha * global_mi
            metrics["global_mi_loss"] = global_mi.detach()
        if self.cfg.gamma:
            fake = torch.sigmoid(fp32(y))
            real = torch.rand_like(fake)                                                # the uniform prior
            # E_prior[log D(v)] + E_data[log(1 - D(fake))], D = sigmoid(logit)
            value = -F.softplus(-self.prior_d(real)).mean() - F.softplus(self.prior_d(fake)).mean()
            loss = loss + self.cfg.gamma * value
            metrics["prior_value"] = value.detach()
        return StepOut(loss, metrics, embedding=F.normalize(fp32(y.detach()), dim=1))

    def optimizer_groups(self) -> dict[str, dict]:
        return {"prior_d": {"weight_decay": 0.0, "lr_scale": self.cfg.prior_lr_scale}} if self.cfg.gamma else {}

    def before_optimizer_step(self, progress: float) -> None:
        # the encoder minimises the prior term, the discriminator maximises it: ascend on D's parameters
        if self.prior_d is not None:
            for p in self.prior_d.parameters():
                if p.grad is not None:
                    p.grad.neg_()

    def encoder(self) -> nn.Module:
        return self.backbone

    @staticmethod
    def check_spec(spec, manifest) -> None:
        from .backbones import build_backbone

        try:
            local_layer(build_backbone(spec.model, manifest.channels, 32))
        except ValueError as e:
            raise ConfigError(f"recipe dim: model.name={spec.model.name}: {e}") from None
        if not (spec.recipe.alpha or spec.recipe.beta):
            raise ConfigError("recipe dim: recipe.alpha and recipe.beta are both 0: nothing to maximise")
