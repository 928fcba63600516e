"""MoCo v3 (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers", 2021).

No queue: the negatives of a query are the keys of the whole global batch (Sec. 3, Alg. 1), gathered from every
worker without gradient. The query encoder is backbone + projection MLP + prediction MLP; the momentum encoder
is backbone + projection MLP, following the query encoder with a momentum that rises from 0.99 to 1 on a cosine
schedule. The loss is symmetrised, ctr(q1, k2) + ctr(q2, k1), each scaled by 2*tau.

Defaults are the ResNet-50 setting of the authors' reference code (main_moco.py, CONFIG.md, which the paper's
ResNet-50 results use): LARS, lr 0.6 per 256 images, wd 1e-6, 10 warm-up epochs, tau = 1.0. The ViT setting
(Sec. 5: AdamW, lr 1.5e-4 per 256, wd 0.1, 40 warm-up epochs, tau = 0.2, the frozen random patch projection of
Sec. 4.2) is the preset `sslab/presets/mocov3_vit.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import knob
from ..datasets.views import ViewSet, ViewSpec
from .. import dist
from ..schedules import cosine_ramp
from .ema import ema_update, frozen_copy
from .heads import mlp
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class MoCoV3Config:
    dim: int = knob(256, "output width of the projection and prediction MLPs (Sec. 5)", min=1)
    hidden: int = knob(4096, "hidden width of both MLPs (Sec. 5)", min=1)
    proj_layers: int = knob(3, "projection MLP depth: 3 in the paper (Sec. 5); the authors' ResNet code uses 2", min=1)
    pred_layers: int = knob(2, "prediction MLP depth (Sec. 5)", min=1)
    temperature: float = knob(1.0, "tau: 1.0 for ResNet (authors' code), 0.2 for ViT (Sec. 5)", min=0.0,
                              min_exclusive=True)
    momentum: float = knob(0.99, "momentum at the start; rises to 1 on a cosine schedule", min=0.0, max=1.0)


def mocov3_views(rc, data, size):
    # BYOL's asymmetric views, as the authors' code uses them: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2;
    # view 0 always blurred, view 1 blurred 10% and solarised 20%. Crop minimum data.min_scale (0.2 for ResNet,
    # 0.08 for ViT). Under 64 px blur is off (a 3 px kernel on 28-32 px images blurs away most detail);
    # data.blur_p >= 0 sets both views' blur.
    b0, b1 = (1.0, 0.1) if size >= 64 else (0.0, 0.0)
    if data.blur_p >= 0:
        b0 = b1 = data.blur_p
    spec = dict(size=size, scale=(data.min_scale, 1.0), strength=data.strength, saturation=0.2)
    return ViewSet((("view", ViewSpec(**spec, blur_p=b0), 1), ("view", ViewSpec(**spec, blur_p=b1, solarize_p=0.2), 1)))


def contrast(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Alg. 1's ctr(q, k): q [n, d] this worker's queries, k [n, d] its keys of the other view. Each query is
    scored against all N keys of the global batch (logits [n, N]); its positive is its own key, at global row
    rank * n + i. Cross-entropy scaled by 2*tau. Keys carry no gradient."""
    q = F.normalize(q, dim=1)
    keys = F.normalize(dist.gather(k.detach()), dim=1)                 # [N, d], rank-major
    logits = q @ keys.to(q.dtype).T / temperature                    # [n, N]
    labels = torch.arange(q.shape[0], device=q.device) + dist.rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register("mocov3", config=MoCoV3Config, views=mocov3_views,
          engine={"optimizer": "lars", "base_lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10})
class MoCoV3(nn.Module, Recipe):
    """MoCo v3: momentum encoder, prediction head, symmetrised InfoNCE over the gathered keys of the batch."""

    def __init__(self, cfg: MoCoV3Config, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        # every layer of both MLPs has BN, the output layers a BN without affine (Sec. 5, following SimCLR)
        self.projector = mlp(self.backbone.feat_dim, cfg.hidden, cfg.dim, cfg.proj_layers, last_bn=True)
        self.predictor = mlp(cfg.dim, cfg.hidden, cfg.dim, cfg.pred_layers, last_bn=True)
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        # one pass per view, as in Alg. 1: BN statistics are per view
        q1, q2 = (self.predictor(self.projector(self.backbone(v))) for v in views[:2])       # [n, dim]
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(self.momentum_backbone(v)) for v in views[:2])  # [n, dim]
        loss = contrast(q1, k2, self.cfg.temperature) + contrast(q2, k1, self.cfg.temperature)
        return StepOut(loss, {"momentum": cosine_ramp(progress, self.cfg.momentum, 1.0)},
                       embedding=F.normalize(q1.detach(), dim=1))

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = cosine_ramp(progress, self.cfg.momentum, 1.0)
        ema_update(self.momentum_backbone, self.backbone, m)
        ema_update(self.momentum_projector, self.projector, m)

    def encoder(self) -> nn.Module:
        return self.backbone
