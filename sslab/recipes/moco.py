"""MoCo v1 (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", 2019) and MoCo v2
(Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020).

A query encoder trained by gradients, a key encoder that follows it by momentum (Sec. 3.2), and a queue of the
last K keys as the negatives (Sec. 3.1). v2 changes only the head (2-layer MLP), the temperature (0.2), the
augmentation (+ blur) and the schedule (cosine); the engine's schedule is always warm-up + cosine, so v1 runs
with cosine too instead of the paper's steps at epochs 120 and 160.

Shuffle-BN (Sec. 3.3). BN statistics shared by a query and its positive key would let the model spot the
positive among the queue's keys (they came from other batches). The paper computes BN per GPU and hands the
key encoder a shuffled assignment of samples to GPUs. Here:
- across workers, the key batch is shuffled over the global batch (`dist.shuffle_across`) and the keys are
  unshuffled afterwards, so a query's BN group and its key's BN group hold different samples;
- on one worker (or within each worker), `recipe.bn_groups=G` emulates G GPUs: both encoders compute BN
  statistics per group of n/G samples, the key encoder on a randomly permuted batch. Use it when training on
  one GPU (e.g. bn_groups=8, the paper's 8 GPUs). 0 = one group per worker.
Both need BatchNorm computed per worker: the engine's SyncBatchNorm conversion (GPU, several workers) would
pool the statistics of the whole global batch; `sync_bn = False` below asks the engine not to convert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, knob
from ..datasets.views import ViewSet, ViewSpec, two_views
from .. import dist
from .ema import ema_update, frozen_copy
from .heads import mlp
from .losses import info_nce
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class MoCoConfig:
    dim: int = knob(128, "key/query dimension (Sec. 3.3: 128-D, L2-normalised)", min=1)
    head_layers: int = knob(1, "head depth: 1 = v1's linear fc, 2 = v2's MLP (no BN)", min=1)
    hidden: int = knob(0, "MLP hidden width; 0 = the backbone's width (v2: 2048 on ResNet-50)", min=0)
    queue_size: int = knob(65536, "K negatives in the queue (Sec. 4); a multiple of the global batch", min=1)
    momentum: float = knob(0.999, "key-encoder momentum m (Sec. 4.1 ablation)", min=0.0, max=1.0)
    temperature: float = knob(0.07, "InfoNCE temperature tau (Sec. 3.1)", min=0.0, min_exclusive=True)
    bn_groups: int = knob(0, "BN groups per worker (shuffle-BN emulation of several GPUs); 0 = one", min=0)


@dataclass(frozen=True)
class MoCoV2Config(MoCoConfig):
    head_layers: int = knob(2, "head depth: 2 = v2's MLP with a ReLU hidden layer (no BN), 1 = linear", min=1)
    temperature: float = knob(0.2, "InfoNCE temperature (v2 Table 1: 0.2 with the MLP head)", min=0.0,
                              min_exclusive=True)


def mocov1_views(rc, data, size):
    # v1 (Sec. 3.3 and the authors' code): crop (0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.4) always, grayscale 0.2, flip
    spec = ViewSpec(size, (data.min_scale, 1.0), jitter_p=1.0, hue=0.4, strength=data.strength,
                    blur_p=max(data.blur_p, 0.0))
    return ViewSet((("view", spec, 2),))


def mocov2_views(rc, data, size):
    # v2 adds blur p=0.5 (sigma 0.1-2) at ImageNet size; for small images (< 64 px) blur is off, as in
    # SimCLR's CIFAR setting: a kernel of ~10% of a 28-32 px image removes most of the detail there is
    blur = data.blur_p if data.blur_p >= 0 else (0.5 if size >= 64 else 0.0)
    return two_views(size, strength=data.strength, blur_p=blur, min_scale=data.min_scale)


def _check_queue(queue_size: int, batch: int) -> None:
    if queue_size % batch:
        raise ConfigError(f"recipe.queue_size={queue_size} must be a multiple of the global batch "
                          f"engine.batch_size={batch} (every step enqueues the whole batch's keys)")


@register("mocov1", config=MoCoConfig, views=mocov1_views,
          engine={"optimizer": "sgd", "base_lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0})
class MoCo(nn.Module, Recipe):
    """MoCo v1: momentum key encoder, a queue of 65536 gathered keys as negatives, linear head, shuffle-BN."""

    sync_bn = False  # shuffle-BN needs per-worker BatchNorm statistics

    def __init__(self, cfg: MoCoConfig, ctx: RecipeContext):
        super().__init__()
        _check_queue(cfg.queue_size, ctx.batch_size)
        self.cfg = cfg
        self.backbone = ctx.make_backbone()
        width = self.backbone.feat_dim
        self.head = mlp(width, cfg.hidden or width, cfg.dim, cfg.head_layers, bn=False)
        self.key_backbone, self.key_head = frozen_copy(self.backbone), frozen_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))  # [K, dim]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to overwrite
        self._keys: torch.Tensor | None = None  # this step's keys, enqueued by after_step

    @staticmethod
    def check_spec(spec, manifest) -> None:
        eng = spec.engine
        _check_queue(spec.recipe.queue_size, eng.batch_size)
        groups = max(1, spec.recipe.bn_groups)
        if eng.workers and (eng.batch_size // eng.workers) % groups:
            raise ConfigError(f"recipe.bn_groups={groups} must divide the per-worker batch "
                              f"{eng.batch_size // eng.workers} (engine.batch_size / engine.workers)")

    def _encode(self, backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """head(backbone(x)) L2-normalised, with BatchNorm statistics per group of n/G samples."""
        groups = max(1, self.cfg.bn_groups)
        if x.shape[0] % groups:
            raise ConfigError(f"recipe.bn_groups={groups} must divide the per-worker batch {x.shape[0]}")
        z = torch.cat([head(backbone(part)) for part in x.chunk(groups)])
        return F.normalize(z, dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, progress: float) -> torch.Tensor:
        """Keys [n, dim] of this worker's key views, computed on a shuffled batch (shuffle-BN) and unshuffled."""
        shuffle = dist.world_size() > 1 or self.cfg.bn_groups > 1
        if not shuffle:  # one worker, one BN group: a permutation would change nothing
            return self._encode(self.key_backbone, self.key_head, x)
        seed = int(progress * 2**31)  # the same on every worker, new every step, replayed on resume
        shuffled, inv = dist.shuffle_across(x, seed)
        return dist.unshuffle(self._encode(self.key_backbone, self.key_head, shuffled), inv)

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        q = self._encode(self.backbone, self.head, views[0])  # queries [n, dim]
        k = self.keys(views[1], progress)                      # positive keys [n, dim], no gradient
        self._keys = k
        loss = info_nce(q, k, self.queue, self.cfg.temperature)  # logits n x (1+K); the queue is not trained
        return StepOut(loss, {"pos_sim": (q.detach() * k).sum(1).mean()}, embedding=q.detach())

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.cfg.momentum)
        ema_update(self.key_head, self.head, self.cfg.momentum)
        if self._keys is None:
            return
        k = dist.gather(self._keys.to(self.queue.dtype))  # [N, dim] in rank order: the same queue everywhere
        rows = (self.queue_ptr + torch.arange(k.shape[0], device=k.device)) % self.cfg.queue_size
        self.queue.index_copy_(0, rows, k)                 # replace the oldest N keys
        self.queue_ptr.copy_((self.queue_ptr + k.shape[0]) % self.cfg.queue_size)
        self._keys = None

    def encoder(self) -> nn.Module:
        return self.backbone


@register("mocov2", config=MoCoV2Config, views=mocov2_views,
          engine={"optimizer": "sgd", "base_lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0})
class MoCoV2(MoCo):
    """MoCo v2: MoCo v1 with a 2-layer MLP head, temperature 0.2, blur augmentation and a cosine schedule."""
