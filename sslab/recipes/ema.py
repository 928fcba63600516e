"""Momentum (EMA) copies: MoCo's key encoder, BYOL's target, DINO's teacher."""
from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that is never trained by gradients: it only follows `module` through `ema_update`."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter; buffers (BN statistics)
    are copied from the online network. Parameters are matched by name so frozen parts line up."""
    online_params = dict(online.named_parameters())
    params = [(t, online_params[n]) for n, t in target.named_parameters()]
    if params:
        torch._foreach_lerp_([t for t, _ in params], [o.detach() for _, o in params], 1.0 - momentum)
    online_buffers = dict(online.named_buffers())
    for n, b in target.named_buffers():
        b.copy_(online_buffers[n])
