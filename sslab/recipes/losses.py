"""Losses as pure functions of embeddings. Negatives that span workers come from `dist.gather_with_grad`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..platform import dist


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
