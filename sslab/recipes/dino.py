"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021)."""
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
from .losses import multi_crop_cross_entropy
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class DINOConfig:
    out_dim: int = knob(4096, "K, outputs of the head's last layer (paper: 65536; 4096 suits 10-class data)", min=2)
    hidden: int = knob(2048, "hidden width of the 3-layer head MLP (§3.1)", min=1)
    bottleneck: int = knob(256, "head bottleneck before the weight-normalised last layer", min=1)
    student_temp: float = knob(0.1, "student softmax temperature", min=0.0, min_exclusive=True)
    teacher_temp: float = knob(0.07, "teacher temperature after the warm-up", min=0.0, min_exclusive=True)
    warmup_teacher_temp: float = knob(0.04, "teacher temperature at the start", min=0.0, min_exclusive=True)
    teacher_temp_warmup: float = knob(0.3, "fraction of training over which the teacher temperature rises "
                                           "linearly (§3.2: the first 30 epochs of 100)", min=0.0, max=1.0)
    center_momentum: float = knob(0.9, "EMA rate of the centre of teacher outputs (eq. 4)", min=0.0, max=1.0)
    momentum: float = knob(0.996, "teacher EMA rate at the start; cosine to momentum_end", min=0.0, max=1.0)
    momentum_end: float = knob(1.0, "teacher EMA rate at the end", min=0.0, max=1.0)
    n_local: int = knob(8, "low-resolution local crops, seen by the student only", min=0)
    local_size: int = knob(0, "side of local crops in pixels; 0 = 96/224 of the global side (28 px -> 12)", min=0)
    local_scale: tuple[float, float] = knob((0.05, 0.4), "area fraction range of local crops", min=0.0, max=1.0)
    freeze_last_layer_epochs: float = knob(1.0, "the last layer gets no update in the first N epochs", min=0.0)


def local_side(rc, size: int) -> int:
    return rc.local_size or max(4, round(size * 96 / 224))


def dino_views(rc, data, size):
    # BYOL's asymmetric globals (blur 1.0 / 0.1, solarize 0 / 0.2), locals blurred with p 0.5; blur only from 64 px
    # (as SimCLR's CIFAR setting) unless data.blur_p sets one probability for every crop
    def blur(p):
        return data.blur_p if data.blur_p >= 0 else (p if size >= 64 else 0.0)
    g = (data.min_scale, 1.0)
    groups = [("view", ViewSpec(size, g, strength=data.strength, blur_p=blur(1.0)), 1),
              ("view", ViewSpec(size, g, strength=data.strength, blur_p=blur(0.1), solarize_p=0.2), 1)]
    if rc.n_local:
        groups.append(("local", ViewSpec(local_side(rc, size), tuple(rc.local_scale), strength=data.strength,
                                         blur_p=blur(0.5)), rc.n_local))
    return ViewSet(tuple(groups))


class Student(nn.Module):
    """Backbone once per resolution (globals, then locals), then the DINO head on all crops: returns the
    features [V n, feat_dim] and the logits [V n, K], crops in view order."""

    def __init__(self, backbone: nn.Module, cfg: DINOConfig):
        super().__init__()
        self.backbone = backbone
        self.mlp = nn.Sequential(nn.Linear(backbone.feat_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden),
                                 nn.GELU(), nn.Linear(cfg.hidden, cfg.bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.Linear(cfg.bottleneck, cfg.out_dim, bias=False)  # weight-normalised, norm fixed at 1

    def forward(self, crops: list[torch.Tensor]):
        feats = [self.backbone(torch.cat(crops[:2]))] + ([self.backbone(torch.cat(crops[2:]))] if crops[2:] else [])
        feats = torch.cat(feats)
        b = F.normalize(self.mlp(feats), dim=1)                     # [V n, bottleneck], on the unit sphere
        return feats, F.linear(b, F.normalize(self.last.weight, dim=1))


# §3.2: AdamW, lr 5e-4 x B/256, weight decay cosine 0.04 -> 0.4; the official code's defaults: gradient
# clipping 3.0, stochastic depth 0.1 (ViT-S), global crops of 40-100% of the area, last layer frozen 1 epoch
@register("dino", config=DINOConfig, views=dino_views,
          engine={"optimizer": "adamw", "base_lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
                  "clip_grad": 3.0, "model.name": "vit_tiny", "model.drop_path": 0.1, "data.min_scale": 0.4})
class DINO(nn.Module, Recipe):
    """DINO: a student matches a centred, sharpened EMA teacher across crops (self-distillation, no labels)."""

    def __init__(self, cfg: DINOConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg, self.epochs = cfg, ctx.epochs
        self.student = Student(ctx.make_backbone(), cfg)
        self.teacher = frozen_copy(self.student)
        for m in self.teacher.modules():  # the teacher runs without stochastic depth
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # C of eq. 4, same on every worker
        self._teacher_out = None  # this step's teacher logits, for the centre update in after_step

    def teacher_temp(self, progress: float) -> float:
        c = self.cfg
        ramp = min(1.0, progress / c.teacher_temp_warmup) if c.teacher_temp_warmup else 1.0
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * ramp

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        n = views[0].shape[0]
        feats, logits = self.student(views)                 # [V n, K]: every crop
        with torch.no_grad():                               # the teacher sees the 2 global crops only
            t = self.teacher(views[:2])[1]                  # [2n, K]
            targets = F.softmax((t - self.center) / self.teacher_temp(progress), dim=1).split(n)
        self._teacher_out = t
        loss = multi_crop_cross_entropy(list(logits.split(n)), list(targets), self.cfg.student_temp)
        # the monitor watches the representation itself: the head's outputs start near uniform by design
        return StepOut(loss, {"teacher_temp": self.teacher_temp(progress)}, embedding=feats[:n].detach())

    def before_optimizer_step(self, progress: float) -> None:
        if progress * self.epochs + 1e-9 < self.cfg.freeze_last_layer_epochs:
            self.student.last.weight.grad = None  # the first epoch: no update of the last layer (stability)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.teacher, self.student, cosine_ramp(progress, self.cfg.momentum, self.cfg.momentum_end))
        if self._teacher_out is not None:  # C <- m C + (1 - m) mean of the teacher outputs of the global batch
            t, self._teacher_out = self._teacher_out, None
            total = dist.all_reduce(t.to(self.center.dtype).sum(dim=0, keepdim=True))
            batch_mean = total / (t.shape[0] * dist.world_size())
            self.center.mul_(self.cfg.center_momentum).add_(batch_mean, alpha=1 - self.cfg.center_momentum)

    def encoder(self) -> nn.Module:
        return self.student.backbone
