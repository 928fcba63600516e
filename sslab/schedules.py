"""Schedules: pure functions of the step (or of progress in [0, 1]), so a resumed run continues exactly where it
stopped and every schedule is a knob Tune can search. Recipes use them for their own momentum and temperatures."""
from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final_ratio: float = 0.0) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to `final_ratio * peak`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """Cosine schedule from `start` at progress 0 to `end` at progress 1 (BYOL/MoCo v3 momentum, DINO)."""
    return end - (end - start) * (math.cos(math.pi * min(1.0, max(0.0, progress))) + 1) / 2


@dataclass(frozen=True)
class Schedule:
    """The optimiser's schedule over a whole run: learning rate and weight decay at every step."""
    total_steps: int
    warmup_steps: int
    peak_lr: float
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    weight_decay_end: float = -1.0      # < 0: constant weight decay

    def progress(self, step: int) -> float:
        return step / self.total_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr_ratio)

    def wd(self, step: int) -> float:
        if self.weight_decay_end < 0:
            return self.weight_decay
        return cosine_ramp(self.progress(step), self.weight_decay, self.weight_decay_end)
