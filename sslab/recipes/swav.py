"""SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, knob
from ..datasets.views import ViewSet, ViewSpec
from .. import dist
from .dino import local_side
from .heads import mlp
from .losses import multi_crop_cross_entropy, sinkhorn
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class SwAVConfig:
    dim: int = knob(128, "projection output dimension (appendix A.1)", min=1)
    hidden: int = knob(2048, "projection MLP hidden width", min=1)
    prototypes: int = knob(3000, "number of prototypes K (the ImageNet setting)", min=2)
    temperature: float = knob(0.1, "softmax temperature of the swapped prediction (eq. 2)", min=0.0, min_exclusive=True)
    epsilon: float = knob(0.05, "Sinkhorn-Knopp entropy regularisation (eq. 3)", min=0.0, min_exclusive=True)
    sinkhorn_iters: int = knob(3, "Sinkhorn-Knopp iterations", min=1)
    n_local: int = knob(6, "low-resolution local crops (2x224 + 6x96 in the paper)", min=0)
    local_size: int = knob(0, "side of local crops in pixels; 0 = 96/224 of the global side (28 px -> 12)", min=0)
    local_scale: tuple[float, float] = knob((0.05, 0.14), "area fraction range of local crops", min=0.0, max=1.0)
    freeze_prototypes_epochs: float = knob(1.0, "the prototypes get no update in the first N epochs", min=0.0)
    queue_length: int = knob(0, "features of earlier batches joined to the codes' batch (0 = off; the paper "
                                "uses 3840 at batch 256); a multiple of engine.batch_size", min=0)
    queue_start_epoch: float = knob(15.0, "epoch from which the queue fills and, once full, is used", min=0.0)


def swav_views(rc, data, size):
    # the paper blurs every crop with p 0.5 on ImageNet; below 64 px no blur (SimCLR's CIFAR setting)
    blur = data.blur_p if data.blur_p >= 0 else (0.5 if size >= 64 else 0.0)
    groups = [("view", ViewSpec(size, (data.min_scale, 1.0), strength=data.strength, blur_p=blur), 2)]
    if rc.n_local:
        groups.append(("local", ViewSpec(local_side(rc, size), tuple(rc.local_scale), strength=data.strength,
                                         blur_p=blur), rc.n_local))
    return ViewSet(tuple(groups))


# appendix A.1: LARS, lr 4.8 at batch 4096 (0.3 x B/256) on a cosine to 0.0048, weight decay 1e-6;
# global crops of 14-100% of the area
@register("swav", config=SwAVConfig, views=swav_views,
          engine={"optimizer": "lars", "base_lr": 0.3, "weight_decay": 1e-6, "final_lr_ratio": 0.001,
                  "data.min_scale": 0.14})
class SwAV(nn.Module, Recipe):
    """SwAV: predict the Sinkhorn code of one crop from the others, codes balanced over prototypes."""

    def __init__(self, cfg: SwAVConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg, self.epochs = cfg, ctx.epochs
        self.backbone = ctx.make_backbone()
        self.projector = mlp(self.backbone.feat_dim, cfg.hidden, cfg.dim, 2)
        self.prototypes = nn.Linear(cfg.dim, cfg.prototypes, bias=False)   # rows: unit-norm prototypes c_k
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        # each worker keeps its own slice of the queue; Sinkhorn's sums join them: [2 globals, length/world, dim]
        self.register_buffer("queue", torch.zeros(2, cfg.queue_length // dist.world_size(), cfg.dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # rows of the queue holding features
        self._to_enqueue = None

    @staticmethod
    def check_spec(spec, manifest) -> None:
        if spec.recipe.queue_length % spec.engine.batch_size:
            raise ConfigError(f"recipe.queue_length={spec.recipe.queue_length} must be a multiple of "
                              f"engine.batch_size={spec.engine.batch_size} (or 0 for no queue)")

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        n, c = views[0].shape[0], self.cfg
        feats = [self.backbone(torch.cat(views[:2]))] + ([self.backbone(torch.cat(views[2:]))] if views[2:] else [])
        z = F.normalize(self.projector(torch.cat(feats)), dim=1)    # [V n, dim], crops in view order
        scores = self.prototypes(z)                                  # [V n, K]: z . c_k
        queue_on = self.queue.shape[1] > 0 and progress * self.epochs + 1e-9 >= c.queue_start_epoch
        use_queue = queue_on and int(self.queue_filled) == self.queue.shape[1]
        codes = []
        with torch.no_grad():                                        # codes of the 2 global crops, no gradient
            for i in range(2):
                s = scores[i * n:(i + 1) * n].detach()
                if use_queue:
                    s = torch.cat([self.queue[i] @ self.prototypes.weight.T, s])
                codes.append(sinkhorn(s, c.epsilon, c.sinkhorn_iters)[-n:])
        self._to_enqueue = z[:2 * n].detach().view(2, n, -1) if queue_on else None
        loss = multi_crop_cross_entropy(list(scores.split(n)), codes, c.temperature)
        return StepOut(loss, {"queue_used": float(use_queue)}, embedding=z[:n].detach())

    def before_optimizer_step(self, progress: float) -> None:
        if progress * self.epochs + 1e-9 < self.cfg.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None   # the first epoch: prototypes stay put (appendix A.1)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))           # back on the unit sphere after every update
        if self._to_enqueue is not None:         # shift the oldest features out, the newest in at the front
            new, self._to_enqueue = self._to_enqueue, None
            n = new.shape[1]
            self.queue[:, n:] = self.queue[:, :-n].clone()
            self.queue[:, :n] = new.to(self.queue.dtype)
            self.queue_filled.fill_(min(self.queue.shape[1], int(self.queue_filled) + n))

    def encoder(self) -> nn.Module:
        return self.backbone
