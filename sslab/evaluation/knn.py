"""Frozen features and the weighted kNN classifier (Wu et al. 2018, InstDisc) that the training monitor and
`sslab eval` both use; the raw-pixel baseline every learned feature must beat."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import dist
from ..datasets.views import normalize


@torch.no_grad()
def knn_predict(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted cosine kNN: each query's k most similar bank rows vote for their class with weight exp(sim/t).

    queries [q, d], bank [b, d] (any scale; rows are L2-normalised here), bank_labels [b] -> predictions [q].
    """
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):                 # chunks bound memory to chunk x b
        sim = queries[start:start + chunk] @ bank.T                  # [c, b]
        top_sim, top_idx = sim.topk(k, dim=1)                        # [c, k]
        weights = (top_sim / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)          # sum weights per class
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(bank_feats, bank_labels, query_feats, query_labels, num_classes, k, t) -> float:
    pred = knn_predict(query_feats, bank_feats, bank_labels.to(bank_feats.device), num_classes, k, t)
    return (pred.cpu() == query_labels.cpu()).float().mean().item()


@functools.lru_cache(maxsize=4)
def eval_split(data_dir: str, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded, labelled images of a split (first `limit`, 0 = all): uint8 [n, C, H, W] and int64 labels [n].
    Cached per process: workers decode them once per run, not once per epoch."""
    from ..datasets.shards import load_split

    images, labels, _ = load_split(data_dir, split, limit or None)
    keep = labels >= 0
    return torch.from_numpy(images[keep]), torch.from_numpy(labels[keep])


@torch.no_grad()
def extract(encoder: torch.nn.Module, images: torch.Tensor, prepare, batch: int = 512) -> torch.Tensor:
    """Features of `images` [n, C, H, W] uint8, computed by this rank on rows rank::world and gathered, so
    every rank returns all n rows in their original order. `prepare` moves/normalises a uint8 batch."""
    was_training = encoder.training
    encoder.eval()
    r, w = dist.rank(), dist.world_size()
    mine = images[r::w]
    feats = [encoder(prepare(mine[i:i + batch])).float() for i in range(0, mine.shape[0], batch)]
    local = torch.cat(feats) if feats else torch.zeros(0, 1)
    encoder.train(was_training)
    gathered = dist.gather_varlen(local)                              # rank-major: rank 0's rows first
    # restore the original order: row j of rank r's slice is global row r + j*w
    order = torch.cat([torch.arange(rr, images.shape[0], w) for rr in range(w)])
    out = torch.empty_like(gathered)
    out[order.to(gathered.device)] = gathered
    return out


def pixel_knn(data_dir: str, num_classes: int, bank: int, queries: int, k: int, t: float) -> float:
    """The raw-pixel baseline: the same kNN on flattened pixels (what any learned feature must beat)."""
    bx, by = eval_split(data_dir, "train", bank)
    qx, qy = eval_split(data_dir, "test", queries)
    return knn_accuracy(bx.flatten(1).float(), by, qx.flatten(1).float(), qy, num_classes, k, t)


def make_prepare(mean, std, size: int, device="cpu"):
    """uint8 [n, C, H, W] -> normalised float [n, C, size, size] on `device` (bilinear resize when the images are
    not `size` already, e.g. a run trained on crops of data.crop_size)."""
    def prepare(x):
        x = normalize(x.to(device), mean, std)
        return F.interpolate(x, size=size, mode="bilinear") if x.shape[-1] != size else x
    return prepare
