"""BYOL (Grill et al., "Bootstrap Your Own Latent", 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import knob
from ..datasets.views import asymmetric_views
from ..schedules import cosine_ramp
from .ema import ema_update, frozen_copy
from .heads import mlp
from .losses import negative_cosine
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class BYOLConfig:
    dim: int = knob(256, "projection and prediction output dimension (§3.3)", min=1)
    hidden: int = knob(4096, "hidden width of the projector and predictor MLPs (§3.3)", min=1)
    momentum: float = knob(0.996, "target EMA rate tau at the start; it rises to momentum_end on a cosine (§3.3)",
                           min=0.0, max=1.0)
    momentum_end: float = knob(1.0, "target EMA rate at the end of training", min=0.0, max=1.0)


def byol_views(rc, data, size):
    # the asymmetric pair of appendix B, table 6: blur 1.0 / 0.1 and solarize 0 / 0.2 make the two views differ
    if data.blur_p >= 0:
        raise ValueError("data.blur_p: byol sets blur per view (1.0 / 0.1, the paper's asymmetric pair); "
                         "leave data.blur_p at -1")
    return asymmetric_views(size, strength=data.strength, min_scale=data.min_scale)


# §3.3: LARS, lr 0.2 x B/256, weight decay 1.5e-6 (not on biases and BN); crops of 8-100% of the area
@register("byol", config=BYOLConfig, views=byol_views,
          engine={"optimizer": "lars", "base_lr": 0.2, "weight_decay": 1.5e-6, "data.min_scale": 0.08})
class BYOL(nn.Module, Recipe):
    """BYOL: an online network predicts an EMA target network's projection of the other view; no negatives."""

    def __init__(self, cfg: BYOLConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        backbone = ctx.make_backbone()
        self.online = nn.Sequential(backbone, mlp(backbone.feat_dim, cfg.hidden, cfg.dim, 2))  # f, g
        self.predictor = mlp(cfg.dim, cfg.hidden, cfg.dim, 2)                                # q
        self.target = frozen_copy(self.online)          # xi: follows the online weights by EMA only

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        n = views[0].shape[0]
        z = self.online(torch.cat(views[:2]))            # both views in one pass: [2n, dim]
        p1, p2 = self.predictor(z).split(n)
        with torch.no_grad():                            # the target is never trained by gradients
            t1, t2 = self.target(torch.cat(views[:2])).split(n)
        # eq. 2 symmetrised: (2 - 2cos(p1, t2)) + (2 - 2cos(p2, t1)), mean over the batch
        loss = 4 + 2 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))
        return StepOut(loss, {"momentum": self.momentum(progress)}, embedding=z[:n].detach())

    def momentum(self, progress: float) -> float:
        """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (§3.3)."""
        return cosine_ramp(progress, self.cfg.momentum, self.cfg.momentum_end)

    def after_step(self, progress: float) -> None:
        ema_update(self.target, self.online, self.momentum(progress))

    def encoder(self) -> nn.Module:
        return self.online[0]
