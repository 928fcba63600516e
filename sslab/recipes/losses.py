"""Losses as pure functions of embeddings. Negatives that span workers come from `dist.gather_with_grad`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) over the global batch.

    z1, z2: [n, d] projections of this worker's two views. Every one of the 2n local anchors is contrasted with
    all 2N = 2 * world * n gathered embeddings: its positive (the other view of its image) and 2(N-1)
    negatives. The mean over local anchors, averaged over workers by data-parallel gradient averaging, equals
    the loss of one process holding the whole batch.
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all1, all2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)   # [N, d] each
    cand = torch.cat([all1, all2])                                      # [2N, d]: view-1 block, then view-2 block
    big_n = all1.shape[0]
    offset = dist.rank() * n
    anchors = torch.cat([z1, z2])                                       # [2n, d]
    logits = anchors @ cand.T / temperature                             # [2n, 2N]
    own = torch.arange(n, device=z1.device) + offset                    # global row of each local image
    self_idx = torch.cat([own, own + big_n])                            # where each anchor sits in `cand`
    pos_idx = torch.cat([own + big_n, own])                             # its other view
    logits[torch.arange(2 * n, device=z1.device), self_idx] = float("-inf")  # never contrast with itself
    return F.cross_entropy(logits, pos_idx)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, z) (Chen & He 2021, eq. 1), mean over the batch [n, d]; BYOL's normalised
    squared error ||p/|p| - z/|z|||^2 = 2 - 2cos is 2 + 2D (Grill et al. 2020, eq. 2). Whether z carries a
    gradient (the stop-gradient) is the caller's choice."""
    p, z = _at_least_fp32(p), _at_least_fp32(z)
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def multi_crop_cross_entropy(logits: list[torch.Tensor], targets: list[torch.Tensor],
                             temperature: float) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1-2, multi-crop §3.2) and DINO's loss (Caron et al. 2021,
    eq. 1-2): targets[i] [n, K] is the distribution computed from global crop i (SwAV's codes, DINO's centred and
    sharpened teacher output); every other crop v predicts it with softmax(logits[v] / temperature).
    Mean over the batch and over all pairs (i, v != i) of -sum_k t_ik log p_vk."""
    terms = [-(t * F.log_softmax(_at_least_fp32(logits[v]) / temperature, dim=1)).sum(dim=1).mean()
             for i, t in enumerate(targets) for v in range(len(logits)) if v != i]
    return sum(terms) / len(terms)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's codes (Caron et al. 2020, §3.1 eq. 3 and appendix A.1): Q = exp(scores / epsilon) rescaled in turn
    so that each of the K prototypes holds 1/K of the mass and each of the B samples of the global batch 1/B,
    then scaled by B so every sample's code sums to 1. scores: [n, K] this worker's rows; the per-prototype sums
    run over all workers (all_reduce), so the codes equal those of one process holding the concatenated batch."""
    x = _at_least_fp32(scores) / epsilon
    x = x - dist.all_reduce(x.max().reshape(1), "max")  # one shift shared by all workers: Q unchanged, exp finite
    q = torch.exp(x).T                                   # [K, n]
    k, b = q.shape[0], q.shape[1] * dist.world_size()
    for _ in range(iters):
        q /= dist.all_reduce(q.sum(dim=1, keepdim=True)) * k   # rows: each prototype gets 1/K
        q /= q.sum(dim=0, keepdim=True) * b                    # columns: each sample gets 1/B
    return (q * b).T                                     # [n, K], rows sum to 1


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast -> fp32; fp64 stays


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2019, eq. 1; Algorithm 1): each query q_i [n, d] against its positive key k_i
    [n, d] and the shared negatives [K, d] (MoCo's queue), all L2-normalised by the caller. Logits n x (1+K) with
    the positive in column 0; mean cross-entropy over the n queries. Gradients reach only what the caller did
    not detach (MoCo: the queries)."""
    pos = (q * k).sum(dim=1, keepdim=True)                       # [n, 1]
    neg = q @ negatives.to(q.dtype).T                            # [n, K]
    logits = torch.cat([pos, neg], dim=1) / temperature          # [n, 1+K]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
