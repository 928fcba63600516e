"""SimCLR v1 (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import knob
from ..datasets.views import two_views
from .heads import mlp
from .losses import nt_xent
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class SimCLRConfig:
    dim: int = knob(128, "projection output dimension", min=1)
    hidden: int = knob(0, "projection hidden width; 0 = the backbone's feature width, as in the paper", min=0)
    layers: int = knob(2, "projection MLP depth (v1: 2 layers, v2: 3)", min=1)
    temperature: float = knob(0.5, "NT-Xent temperature (the paper's CIFAR-10 setting)", min=0.0, min_exclusive=True)


def simclr_views(rc, data, size):
    # the paper blurs ImageNet-sized views only; for CIFAR-sized images it drops blur (appendix B.9)
    blur = data.blur_p if data.blur_p >= 0 else (0.5 if size >= 64 else 0.0)
    return two_views(size, strength=data.strength, blur_p=blur, min_scale=data.min_scale)


@register("simclr", config=SimCLRConfig, views=simclr_views,
          engine={"optimizer": "lars", "base_lr": 0.3, "weight_decay": 1e-6})
class SimCLR(nn.Module, Recipe):
    """SimCLR v1: two views, MLP projection, NT-Xent whose negatives are the whole global batch."""

    def __init__(self, cfg: SimCLRConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        width = self.backbone.feat_dim
        self.projector = mlp(width, cfg.hidden or width, cfg.dim, cfg.layers)

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views[:2])))  # both views in one pass: [2n, dim]
        z1, z2 = z[:n], z[n:]
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return StepOut(loss, embedding=F.normalize(z1.detach(), dim=1))

    def encoder(self) -> nn.Module:
        return self.backbone
