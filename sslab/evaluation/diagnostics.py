"""Scores of a representation computed during training, without labels."""
from __future__ import annotations

import math

import torch


def collapse_score(embedding: torch.Tensor) -> float:
    """SimSiam's collapse monitor: std over the batch of L2-normalised outputs, per dimension, averaged, times
    sqrt(d). About 1 for a healthy spread-out representation, 0 when every input maps to one point."""
    z = torch.nn.functional.normalize(embedding.float(), dim=1)
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()
