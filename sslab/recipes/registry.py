"""The recipe registry and the small protocol the engine knows recipes by.

A recipe is a plain ``nn.Module``:
- ``forward(views, batch, progress) -> StepOut`` computes one step's loss. ``views`` is a list of normalised
  float tensors, one per view column (multi-crop: globals first); ``batch`` holds "index" and "label" [n];
  ``progress`` in [0, 1] drives every schedule (momentum, temperatures), so resume is exact.
- ``encoder()`` returns the backbone that evaluation and export use.
Optional hooks the engine calls when a recipe defines them:
- ``before_optimizer_step(progress)``: after backward, before clipping and the step (DINO zeroes the last layer's
  gradient in the first epoch; SwAV freezes its prototypes).
- ``after_step(progress)``: non-gradient state updates (EMA targets, queues, banks, centres).
- ``check_spec(spec, manifest)`` (static): checks needing the engine/data settings, e.g. a queue length that
  must divide by the global batch; raise ``ConfigError``. Runs before any cluster time is spent.
Recipes know nothing of Ray and never import torch.distributed; they get their device from the engine and
their collectives from ``sslab.dist``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import ConfigError


@dataclass
class StepOut:
    loss: torch.Tensor                      # scalar to minimise
    metrics: dict[str, Any] = field(default_factory=dict)  # extra scalars to log (detached)
    embedding: torch.Tensor | None = None   # [n, d] outputs for the collapse monitor (std of L2-normalised rows)


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe may know about its run, handed over by the engine."""
    make_backbone: Callable[..., nn.Module]  # make_backbone(in_chans=channels): fresh backbone with .feat_dim
    num_train: int                          # training images (memory banks need one slot each)
    channels: int
    image_size: int
    epochs: int
    batch_size: int                         # global batch, all workers together
    mean: tuple[float, ...] = ()            # per-channel normalisation of the views: x = (pixel/255 - mean) / std;
    std: tuple[float, ...] = ()             # () = none (CMC undoes it to convert RGB to Lab)


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    cls: type
    config: type                              # the recipe's frozen config dataclass (paper defaults)
    views: Callable[[Any, Any, int], Any]     # (recipe_cfg, data_cfg, image_size) -> ViewSet
    engine: dict                              # engine/model settings the paper trains with (overridable)
    summary: str


_REGISTRY: dict[str, RecipeInfo] = {}


def register(name: str, *, config: type, views: Callable, engine: dict | None = None):
    """Class decorator adding a recipe to the registry under `name`."""
    def deco(cls):
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RecipeInfo(name, cls, config, views, dict(engine or {}), doc[0] if doc else "")
        return cls
    return deco


def get(name: str) -> RecipeInfo:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown recipe {name!r}; registered recipes: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    # importing the package imports every recipe module, each registering itself
    from .. import recipes  # noqa: F401
