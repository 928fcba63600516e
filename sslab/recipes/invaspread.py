"""InvaSpread (Ye et al., "Unsupervised Embedding Learning via Invariant and Spreading Instance Feature", CVPR 2019)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import knob
from ..datasets.views import ViewSet
from .. import dist
from .instdisc import instance_spec
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class InvaSpreadConfig:
    dim: int = knob(128, "embedding dimension (sec. 4)", min=1)
    temperature: float = knob(0.1, "softmax temperature tau (sec. 4)", min=0.0, min_exclusive=True)


def invaspread_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The invariance-and-spreading objective over the global batch, in its symmetric batch form.

    z1, z2: [n, d] unit embeddings of this rank's two views. The 2N embeddings of the global batch are the weights
    of an instance classifier (constants: no gradient flows through them, as in the authors' code); each of the 2N
    embeddings x is an anchor with its positive x+ (the other view of its image) and 2(N-1) negatives k:
        P(x+ | x) = exp(x+.x / tau) / D(x),   P(k | x) = exp(k.x / tau) / D(x),   D(x) = sum_{j != x} exp(j.x / tau)
    invariance: the augmented sample is recognised as its own instance; spreading: it is recognised as no other one
    (sec. 3.1, the two taken as independent events):
        J = -1/(2N) sum_x [ log P(x+ | x) + sum_{k != x, x+} log(1 - P(k | x)) ]
    The mean over this rank's 2n anchors, averaged over workers by data-parallel gradient averaging, equals J.
    """
    n = z1.shape[0]
    anchors = torch.cat([z1, z2])                                          # [2n, d], with gradient
    weights = torch.cat([dist.gather(z1), dist.gather(z2)]).detach()       # [2N, d]: view-1 block, view-2 block
    big_n = weights.shape[0] // 2
    own = torch.arange(n, device=z1.device) + dist.rank() * n               # global image of each local row
    self_idx, pos_idx = torch.cat([own, own + big_n]), torch.cat([own + big_n, own])
    rows = torch.arange(2 * n, device=z1.device)
    logits = anchors @ weights.T / tau                                     # [2n, 2N]
    logits[rows, self_idx] = float("-inf")                                 # D(x) leaves x itself out
    log_p = F.log_softmax(logits, dim=1)
    others = torch.ones_like(log_p, dtype=torch.bool)
    others[rows, self_idx] = False
    others[rows, pos_idx] = False                                          # the 2(N-1) negatives
    # log(1 - P); P < 1 always in exact arithmetic, the clamp keeps float32 rounding finite
    log_not = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
    return -(log_p[rows, pos_idx] + (log_not * others).sum(1)).mean()


def invaspread_views(rc, data, size):
    return ViewSet((("view", instance_spec(size, data), 2),))   # x and its augmentation x^ (the code augments both)


# the authors' CIFAR setting: SGD lr 0.03 at batch 128 (base_lr is per 256), momentum 0.9, weight decay 5e-4
@register("invaspread", config=InvaSpreadConfig, views=invaspread_views,
          engine={"optimizer": "sgd", "base_lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128})
class InvaSpread(nn.Module, Recipe):
    """InvaSpread: one encoder end to end, linear head + L2 norm, negatives only from the (global) batch."""

    def __init__(self, cfg: InvaSpreadConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        self.head = nn.Linear(self.backbone.feat_dim, cfg.dim)   # linear, no MLP

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        n = views[0].shape[0]
        z = F.normalize(self.head(self.backbone(torch.cat(views[:2]))), dim=1)   # both views in one pass: [2n, dim]
        loss = invaspread_loss(z[:n], z[n:], self.cfg.temperature)
        return StepOut(loss, embedding=z[:n].detach())

    def encoder(self) -> nn.Module:
        return self.backbone
