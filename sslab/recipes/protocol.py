"""What the training loop knows of a recipe: this protocol, nothing else.

A recipe is a plain `nn.Module` that also subclasses `Recipe` (``class SimCLR(nn.Module, Recipe)``), so it
inherits the documented no-op default of every hook it does not need. The loop calls each hook at its place and
never probes for attributes; a recipe overrides only what its method needs. Recipes know nothing of Ray and never
import torch.distributed: they get their device from the loop and their collectives from `sslab.dist`, and every
schedule is a function of `progress` in [0, 1] (steps done / steps of the whole run), so resume is exact.

Where each hook runs (`optimizer_groups` once, when the optimizer is built), for one epoch:

    before_epoch(epoch, data)            model in training mode, before the epoch's first step
    for each step:
        forward(views, batch, progress)  under autocast; returns StepOut (the loss, metrics, an embedding)
        (backward)
        before_optimizer_step(progress)  gradients exist; before clipping and the optimizer step
        (clip, optimizer step)
        after_step(progress)             non-gradient state: EMA targets, queues, memory banks, centres
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn


@dataclass
class StepOut:
    loss: torch.Tensor                      # scalar to minimise
    metrics: dict[str, Any] = field(default_factory=dict)  # extra scalars to log (detached)
    embedding: torch.Tensor | None = None   # [n, d] outputs for the collapse monitor (std of L2-normalised rows)


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe may know about its run, handed over when it is built."""
    make_backbone: Callable[..., nn.Module]  # make_backbone(in_chans=channels): fresh backbone with .feat_dim
    num_train: int                          # training images (memory banks need one slot each)
    channels: int
    image_size: int
    epochs: int
    batch_size: int                         # global batch, all workers together
    mean: tuple[float, ...] = ()            # per-channel normalisation of the views: x = (pixel/255 - mean) / std;
    std: tuple[float, ...] = ()             # () = none (CMC undoes it to convert RGB to Lab)


# one pass over the worker's training stream: (views, batch) pairs, every one a whole local batch; all workers
# get the same number of them
EpochData = Iterable[tuple[list[torch.Tensor], dict[str, torch.Tensor]]]


class Recipe(Protocol):
    """The hooks the loop calls. `forward` and `encoder` are required; the rest default to doing nothing."""

    # False keeps BatchNorm statistics per worker (MoCo's shuffle-BN); True lets the loop convert BN to SyncBatchNorm
    # when training on several GPUs
    sync_bn: bool = True

    def forward(self, views: list[torch.Tensor], batch: dict[str, torch.Tensor], progress: float) -> StepOut:
        """One step's loss. `views`: normalised float tensors, one per view column (multi-crop: globals first);
        `batch`: "index" (stable row ids) and "label" (-1 when unknown), [n] each, on the device."""
        ...

    def encoder(self) -> nn.Module:
        """The network evaluation and export use (features [n, d] of normalised images)."""
        ...

    def before_epoch(self, epoch: int, data: EpochData) -> dict[str, float]:
        """Before epoch `epoch` (0-based; also after a resume). `data` is one pass over the training stream, read
        only if the recipe iterates it (InstDisc and CMC rewrite their memory banks from it). Returns figures for
        the log, e.g. {"bank_rows_filled": 60000}."""
        return {}

    def optimizer_groups(self) -> dict[str, dict]:
        """Submodules whose parameters need optimizer settings of their own, {name: {"weight_decay": w, "lr_scale":
        s}}, e.g. Deep InfoMax's prior discriminator. Everything else gets the run's settings."""
        return {}

    def before_optimizer_step(self, progress: float) -> None:
        """After backward, before clipping and the optimizer step (DINO drops the last layer's gradient early
        on; SwAV freezes its prototypes)."""

    def after_step(self, progress: float) -> None:
        """After the optimizer step: updates outside the gradient (EMA, queues, banks, centres)."""

    @staticmethod
    def check_spec(spec, manifest) -> None:
        """Checks that need the run's engine and data settings (e.g. a queue length that must divide by the global
        batch); raise `sslab.config.ConfigError`. Runs before any cluster time is spent."""
