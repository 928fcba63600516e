"""Projection and prediction heads shared by recipes."""
from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, *, bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    """`layers` linear layers: (Linear-BN-ReLU) x (layers-1), then Linear [-BN without affine].

    layers=1 is the linear head of InstDisc / MoCo v1; 2 is SimCLR's; 3 is SimCLR v2's and MoCo v3's.
    """
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=not bn)]
        if bn:
            mods.append(nn.BatchNorm1d(hidden))
        mods.append(nn.ReLU(inplace=True))
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)
