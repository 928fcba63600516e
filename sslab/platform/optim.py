"""Optimisers: parameter groups (no decay on biases and norms) and the optimiser by name."""
from __future__ import annotations

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
