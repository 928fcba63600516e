"""Optimisers: parameter groups (no decay on biases and norms) and the optimiser by name."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, own: dict[str, dict] | None = None) -> list[dict]:
    """Biases and normalisation parameters get no weight decay (and, under LARS, no trust-ratio scaling:
    timm's Lars only adapts groups with weight decay), as in SimCLR/BYOL; frozen parameters are left out.
    `own` ({submodule name: {"weight_decay": w, "lr_scale": s}}, from the recipe's `optimizer_groups`) puts a
    submodule's parameters in a group of their own with a fixed weight decay (no schedule) and `lr_scale` times the
    run's learning rate."""
    own = own or {}
    decay, no_decay = [], []
    extra = {prefix: [] for prefix in own}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((k for k in own if name == k or name.startswith(k + ".")), None)
        if prefix is not None:
            extra[prefix].append(p)
        else:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    missing = [k for k, ps in extra.items() if not ps]
    if missing:
        raise ValueError(f"optimizer_groups names {missing}: no trainable parameters under those names")
    return ([{"params": decay, "weight_decay": weight_decay, "decay": True},
             {"params": no_decay, "weight_decay": 0.0, "decay": False}]
            + [{"params": extra[k], "weight_decay": own[k].get("weight_decay", 0.0), "decay": False,
                "lr_scale": own[k].get("lr_scale", 1.0), "name": k} for k in own])


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float,
                    own: dict[str, dict] | None = None):
    groups = param_groups(model, weight_decay, own)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")
