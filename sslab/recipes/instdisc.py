"""InstDisc (Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import knob
from ..datasets.views import ViewSet, ViewSpec
from .memory import MemoryBank, bank_init_knob, fill_pass, fills_bank, loss_knob, z_momentum_knob
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class InstDiscConfig:
    dim: int = knob(128, "feature and memory-bank row dimension (sec. 3.1)", min=1)
    nce_k: int = knob(4096, "NCE noise samples per image, uniform over the bank (sec. 3.2)", min=1)
    temperature: float = knob(0.07, "softmax temperature tau (sec. 3.1)", min=0.0, min_exclusive=True)
    bank_momentum: float = knob(0.5, "proximal update of bank rows: v <- normalise(m v + (1 - m) f) (sec. 3.3)",
                                min=0.0, max=1.0)
    loss: str = loss_knob()
    z_momentum: float = z_momentum_knob()
    bank_init: str = bank_init_knob()


def instance_spec(size: int, data) -> ViewSpec:
    """The augmentation of the InstDisc and InvaSpread code: random resized crop (0.2-1 of the area), flip, colour
    jitter (0.4, 0.4, 0.4, hue 0.4) always applied, grayscale with p 0.2, no blur. `data.strength` scales the jitter."""
    return ViewSpec(size, (data.min_scale, 1.0), jitter_p=1.0, hue=0.4, strength=data.strength,
                    blur_p=max(data.blur_p, 0.0))


def instdisc_views(rc, data, size):
    return ViewSet((("view", instance_spec(size, data), 1),))   # one augmented view per image (sec. 3)


# the paper's ImageNet run: SGD lr 0.03 at batch 256, momentum 0.9 (sec. 4); weight decay 5e-4 as in the authors'
# CIFAR script (their ImageNet script uses 1e-4)
@register("instdisc", config=InstDiscConfig, views=instdisc_views,
          engine={"optimizer": "sgd", "base_lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4})
class InstDisc(nn.Module, Recipe):
    """InstDisc: one view, linear 128-d head, a memory bank of every image, NCE against K uniform noise rows."""

    def __init__(self, cfg: InstDiscConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        self.head = nn.Linear(self.backbone.feat_dim, cfg.dim)          # linear, no non-linearity (sec. 3.1)
        self.bank = MemoryBank(ctx.num_train, cfg.dim, cfg.bank_momentum, cfg.z_momentum, cfg.loss)

    def features(self, views: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(views[0])), dim=1)  # [n, dim] on the unit sphere

    def fills_bank(self, epoch: int) -> bool:
        return fills_bank(self.cfg.bank_init, epoch)

    @torch.no_grad()
    def fill_bank(self, views: list[torch.Tensor], batch: dict) -> None:
        self.bank.fill(self.features(views), batch["index"])

    def before_epoch(self, epoch: int, data) -> dict:
        return fill_pass(data, self.fill_bank) if self.fills_bank(epoch) else {}

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        f = self.features(views)
        index = batch["index"]
        neg = self.bank.negatives(f.shape[0], self.cfg.nce_k)          # [n, K]
        loss = self.bank.loss(f, index, neg, self.cfg.temperature)
        self.bank.stage(f, index)                                      # rows are written in after_step
        return StepOut(loss, {"nce_z": self.bank.z.detach()}, embedding=f.detach())

    def after_step(self, progress: float) -> None:
        self.bank.update()

    def encoder(self) -> nn.Module:
        return self.backbone
