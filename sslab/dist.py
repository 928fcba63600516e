"""The only module that touches torch.distributed.

Every function works at world size 1 (or without an initialised process group) by returning its input, so
recipes and losses can be stepped in a notebook exactly as they run on a cluster.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from all ranks along dim 0 -> [world*n, ...], keeping the autograd graph.

    The backward of torch.distributed.nn's all_gather sums each slice's gradient over all ranks (every rank's
    loss may use every sample), which is what makes the distributed gradient equal to the single-process one.
    """
    if world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    return wait_tensor(all_gather_single_autograd(x.contiguous(), 0, tdist.group.WORLD))


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from all ranks (same n everywhere), without gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Like `gather`, for ranks holding different numbers of rows (evaluation slices)."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather(n).tolist()
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    parts = gather(x).split(max(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


@torch.no_grad()
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `x` with op in {sum, mean, min, max}; returns `x`."""
    if world_size() == 1:
        return x
    if op == "mean":
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        return x.div_(world_size())
    tdist.all_reduce(x, op={"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX}[op])
    return x


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `flag` is true on every rank: lets workers stop an epoch together, never one alone."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    return bool(all_reduce(t, "min").item())


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        tdist.broadcast(x, src)
    return x


@torch.no_grad()
def shuffle_across(x: torch.Tensor, generator_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN helper: gather `x` [n, ...] from all ranks, permute the global batch with a permutation every
    rank draws from the same seed, and return this rank's slice plus the inverse permutation."""
    full = gather(x)
    g = torch.Generator().manual_seed(generator_seed)
    perm = torch.randperm(full.shape[0], generator=g).to(x.device)
    inv = torch.argsort(perm)
    n = x.shape[0]
    return full[perm][rank() * n:(rank() + 1) * n], inv


@torch.no_grad()
def unshuffle(y: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Undo `shuffle_across` for outputs `y` [n, ...]: returns the outputs of this rank's original samples."""
    full = gather(y)[inv]
    n = y.shape[0]
    return full[rank() * n:(rank() + 1) * n]
