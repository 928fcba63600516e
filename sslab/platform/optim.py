"""Optimisers and the learning-rate schedule (a pure function of progress, so resume is exact)."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases and normalisation parameters get no weight decay (and, under LARS, no trust-ratio scaling:
    timm's Lars only adapts groups with weight decay), as in SimCLR/BYOL; frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float):
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final_ratio: float = 0.0) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to `final_ratio * peak`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """Cosine schedule from `start` at progress 0 to `end` at progress 1 (BYOL/MoCo v3 momentum, DINO)."""
    return end - (end - start) * (math.cos(math.pi * min(1.0, max(0.0, progress))) + 1) / 2
