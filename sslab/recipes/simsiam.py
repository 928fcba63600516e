"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", 2021)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import knob
from ..datasets.views import two_views
from .heads import mlp
from .losses import negative_cosine
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class SimSiamConfig:
    dim: int = knob(2048, "projection output dimension, also the projector's hidden width (§4)", min=1)
    pred_hidden: int = knob(512, "predictor bottleneck width (§4: 2048 -> 512 -> 2048)", min=1)
    proj_layers: int = knob(3, "projector depth: 3 on ImageNet, 2 in the paper's CIFAR experiments", min=1)
    stop_gradient: bool = knob(True, "stop the gradient on the target branch; false collapses (§4.1, fig. 2)")
    output_bn: bool = knob(True, "BN on the projector's output (§4.3, table 4: it helps; false is variant b)")


def simsiam_views(rc, data, size):
    # MoCo v2's augmentations; blur only on ImageNet-sized views, as SimCLR's CIFAR setting
    blur = data.blur_p if data.blur_p >= 0 else (0.5 if size >= 64 else 0.0)
    return two_views(size, strength=data.strength, blur_p=blur, min_scale=data.min_scale)


# §4: SGD, lr 0.05 x B/256 on a cosine, weight decay 1e-4, momentum 0.9, no warm-up at batch 512.
# (The paper keeps the predictor's lr fixed, not decayed; the engine decays every group alike.)
@register("simsiam", config=SimSiamConfig, views=simsiam_views,
          engine={"optimizer": "sgd", "base_lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9, "warmup_epochs": 0})
class SimSiam(nn.Module, Recipe):
    """SimSiam: one shared encoder, a predictor and a stop-gradient; no negatives, no momentum encoder."""

    def __init__(self, cfg: SimSiamConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        # BN on every layer including the output (affine-free there, unless output_bn=false), no ReLU at the output
        self.projector = mlp(self.backbone.feat_dim, cfg.dim, cfg.dim, cfg.proj_layers, last_bn=cfg.output_bn)
        self.predictor = mlp(cfg.dim, cfg.pred_hidden, cfg.dim, 2)

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views[:2])))  # [2n, dim]
        p = self.predictor(z)
        target = z.detach() if self.cfg.stop_gradient else z
        z1, z2 = target.split(n)
        p1, p2 = p.split(n)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))  # eq. 3/4, in [-1, 1]
        return StepOut(loss, embedding=z[:n].detach())

    def encoder(self) -> nn.Module:
        return self.backbone
