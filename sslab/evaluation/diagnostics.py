"""Label-free scores of a representation, computed during training and by `sslab eval`:

- `collapse_score`: SimSiam's std of L2-normalised outputs (Chen & He 2021);
- `alignment` and `uniformity` on the hypersphere (Wang & Isola 2020): how close two views of one image land, and
  how evenly the images spread (lower is better for both);
- `effective_rank` (RankMe, Garrido et al. 2023): how many directions the features really use; it falls well
  before the collapse score does.

Every function takes features as rows [n, d] and L2-normalises them itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..datasets.views import make_views, two_views, view_key
from .knn import extract


def collapse_score(embedding: torch.Tensor) -> float:
    """SimSiam's collapse monitor: std over the batch of L2-normalised outputs, per dimension, averaged, times
    sqrt(d). About 1 for a healthy spread-out representation, 0 when every input maps to one point."""
    z = F.normalize(embedding.float(), dim=1)
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean ||f(x) - f(x')||^alpha over the pairs (row i of z1, row i of z2): two views of one image. 0 = every
    pair lands on one point; 4 = opposite points (alpha=2)."""
    z1, z2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    return (z1 - z2).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log of the mean Gaussian potential exp(-t ||f(x) - f(y)||^2) over all pairs of distinct rows. 0 when every row
    is the same point; more negative = spread more evenly over the sphere."""
    if len(z) < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {len(z)}")
    z = F.normalize(z.double(), dim=1)
    sq = torch.pdist(z).pow(2)                                   # the n(n-1)/2 distinct pairs
    return (torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())).item()


def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> float:
    """exp of the entropy of the normalised singular values of the (L2-normalised) feature matrix: k for features
    spread evenly over k orthogonal directions, 1 for one direction."""
    s = torch.linalg.svdvals(F.normalize(z.double(), dim=1))
    p = s / s.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


def sample_views(images: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed pair of SimCLR-style views of `images` (uint8 [n, C, H, W]) at side `size`: the same for every
    epoch and every recipe, so alignment is comparable along a run and across runs."""
    cols = make_views(images, two_views(size), view_key(seed, 0))
    return cols["view0"], cols["view1"]


def representation_scores(encoder: torch.nn.Module, images: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor],
                          prepare) -> dict[str, float]:
    """Alignment (between the two views), uniformity and effective rank (of the images themselves) of `encoder`'s
    features. `prepare` turns a uint8 batch into the encoder's normalised input."""
    feats = extract(encoder, images, prepare)
    f1, f2 = extract(encoder, views[0], prepare), extract(encoder, views[1], prepare)
    return {"alignment": alignment(f1, f2), "uniformity": uniformity(feats), "effective_rank": effective_rank(feats)}
