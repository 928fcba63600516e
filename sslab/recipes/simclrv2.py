"""SimCLR v2 (Chen, Kornblith, Swersky, Norouzi & Hinton, "Big Self-Supervised Models are Strong Semi-Supervised
Learners", 2020), its self-supervised pretraining stage (Sec. 2, "Self-supervised pretraining with SimCLRv2").

SimCLR with a deeper projection head, g = 3 layers (Linear-BN-ReLU, Linear-BN-ReLU, Linear; hidden width = the
backbone's), and instead of throwing g away after pretraining, evaluation and fine-tuning start from its first
layer: `encoder()` is the backbone followed by the head's first Linear-BN-ReLU (`recipe.ft_layers=1`, the
paper's choice; 0 = the bare backbone, as in SimCLR v1).

Paper settings (Sec. 3, implementation details): LARS, batch 4096, peak lr 6.4 = 0.1 * sqrt(4096) with 5%
warm-up and cosine decay, weight decay 1e-4, 800 epochs, global BN. The engine scales the lr linearly, so
base_lr 0.4 gives the paper's 6.4 at batch 4096 (the square-root rule would give 1.6 at batch 256).
Temperature 0.1 is SimCLR's ImageNet setting, kept for v2. Left out: v2's MoCo-style memory of negatives
(worth ~1% in the paper; mocov1/v2 have the queue) and the distillation stage, which needs labels.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import knob
from .registry import register
from .simclr import SimCLR, SimCLRConfig, simclr_views


@dataclass(frozen=True)
class SimCLRv2Config(SimCLRConfig):
    layers: int = knob(3, "projection MLP depth (v2: 3)", min=2)
    temperature: float = knob(0.1, "NT-Xent temperature (SimCLR's ImageNet setting)", min=0.0, min_exclusive=True)
    ft_layers: int = knob(1, "projection layers kept in encoder() for evaluation/fine-tuning (v2: the 1st)", min=0)

    def check(self):
        if self.ft_layers >= self.layers:
            raise ValueError(f"ft_layers={self.ft_layers} must be below layers={self.layers}: the output layer "
                             f"is the contrastive space, not a representation to fine-tune from")


@register("simclrv2", config=SimCLRv2Config, views=simclr_views,
          engine={"optimizer": "lars", "base_lr": 0.4, "weight_decay": 1e-4})
class SimCLRv2(SimCLR):
    """SimCLR v2: SimCLR with a 3-layer projection head; evaluation and fine-tuning from its first layer."""

    def encoder(self) -> nn.Module:
        # each hidden layer of the head is (Linear, BN, ReLU): keep the first ft_layers of them
        return nn.Sequential(self.backbone, *self.projector[:3 * self.cfg.ft_layers])
