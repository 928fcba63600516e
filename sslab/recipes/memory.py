"""The memory bank and NCE loss of non-parametric instance discrimination (Wu et al. 2018, sec. 3.2-3.3), shared by
InstDisc and CMC.

A bank holds one unit-norm row per training image, addressed by the shard's stable index; rows, the normaliser Z
and the negatives' seed and step counter are buffers, so a checkpoint resumes the exact stream. A step:
- `negatives(n, k)`: K noise indices per sample, uniform over the bank with replacement (the paper's P_n = 1/size).
  The generator is seeded by (seed, steps) and draws for the whole global batch; each rank keeps its own rows, so
  the draws of sample j are those one process holding the global batch would make, on any number of workers.
- `nce(f, index, neg, tau)`: the NCE loss of features f against rows (positive: the sample's own row). The first
  call estimates Z from that batch over all ranks and keeps it fixed, as in the paper. With `z_momentum` > 0 every
  later step re-estimates Z the same way and folds it in as a moving average. A fixed Z fails on small, few-class
  data sets: once the bank holds trained rows, same-class noise rows score far above the first batch's random
  ones, the noise terms swamp the positive one and push every feature the same way (the representation
  collapses: on Fashion-MNIST with the paper's settings the loss grew from about 10 to over 1,000 and kNN top-1
  fell to 33% after 2 epochs and 28% after 10, below the untrained network's 74%).
- `softmax(f, index, neg, tau)`: the alternative loss of the CMC authors' later code, cross-entropy of the own row
  against the K noise rows; needs no Z.
- `fill(f, index)` gathers the global batch and writes its rows outright: with `bank_init=encoder`, the recipe's
  `before_epoch` hook runs `fill_pass`, one forward pass of the untrained network over the training stream before epoch 1
  (`bank_init=epoch`: the same pass before every epoch, with the network as it then is). With random rows (the
  papers' start), every positive is noise until its image's first visit while the negatives fill up with real
  features; on Fashion-MNIST that first epoch pulled InstDisc's kNN from 73.75% (untrained) to 62-63%; after the
  pass it rose to 77.4% in the same epoch. Rows written by the proximal update come from a network that kept
  moving during the epoch (after 8 epochs an image's feature had cosine 0.49 with its previous epoch's, two
  unrelated images 0.68), so later epochs again compare features with stale rows; the pass before every epoch
  removes that lag once an epoch, for one forward pass over the data (no backward).
- `stage(f, index)` gathers the global batch's features and indices (a collective, run by every rank in forward);
  `update()` (the recipe's after_step) applies the proximal update v <- normalise(m v + (1 - m) f) to all of them,
  so every replica's bank stays identical without any broadcast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import knob
from .. import dist

LOSSES = ("nce", "softmax")
BANK_INITS = ("random", "encoder", "epoch")


def loss_knob():
    """The recipe knob choosing the bank's loss (shared by InstDisc and CMC)."""
    return knob("nce", "nce: the paper's NCE with its normaliser Z; softmax: cross-entropy of the own row against "
                "the K noise rows (InfoNCE; the CMC authors' later code, which they found better)", choices=LOSSES)


def z_momentum_knob():
    """The recipe knob for NCE's normaliser (shared by InstDisc and CMC)."""
    return knob(0.0, "0: NCE's Z fixed from the first batch (the paper); > 0: re-estimated each step, moving "
                "average with this momentum (needed on small few-class data)", min=0.0, max=1.0)


def bank_init_knob():
    """The recipe knob for how the bank starts (shared by InstDisc and CMC)."""
    return knob("random", "random: random unit rows (the papers), so every positive is noise until the image's first "
                "visit; encoder: before epoch 1, one forward pass of the untrained network over the training stream "
                "writes every row, so positives and negatives are features from the first step; epoch: that pass "
                "before every epoch, with the current network, so no row is older than the epoch", choices=BANK_INITS)


def fills_bank(bank_init: str, epoch: int) -> bool:
    """Whether the fill pass runs before `epoch` (0-based) under the knob above."""
    return bank_init == "epoch" or (bank_init == "encoder" and epoch == 0)


@torch.no_grad()
def fill_pass(data, fill) -> dict[str, int]:
    """One pass of the training stream through the network as it is, no gradients (BN in training mode, as in the
    steps that follow): `fill(views, batch)` writes each whole global batch's rows. `data` yields (views, batch)
    with the same number of batches on every rank (the loop's guarantee: `fill` is a collective); the rows of a
    last, partial global batch stay as they were until their first visit. Returns the rows written."""
    rows = 0
    for views, batch in data:
        fill(views, batch)
        rows += len(batch["index"]) * dist.world_size()
    return {"bank_rows_filled": rows}


def nce_loss(pos: torch.Tensor, neg: torch.Tensor, log_z: torch.Tensor | float, num_data: int) -> torch.Tensor:
    """NCE over logits s/tau (Wu et al. 2018, sec. 3.2): pos [n] for the positive rows, neg [n, K] for the noise.

    P(i|v) = exp(s/tau) / Z,  h = P / (P + K P_n) with P_n = 1/num_data,
    J = -mean_i [ log h(pos_i) + sum_k log(1 - h(neg_ik)) ].
    With c = K P_n: log h = -softplus(log c - log P) and log(1 - h) = -softplus(log P - log c), stable for any P.
    """
    log_c = math.log(neg.shape[1] / num_data)
    log_pos, log_neg = pos - log_z, neg - log_z
    return (F.softplus(log_c - log_pos) + F.softplus(log_neg - log_c).sum(1)).mean()


class MemoryBank(nn.Module):
    """`size` unit rows of width `dim`, random at the start; proximal momentum `momentum` (0.5 in the paper);
    `loss` ("nce" or "softmax") is what `loss()` computes."""

    def __init__(self, size: int, dim: int, momentum: float, z_momentum: float = 0.0, loss: str = "nce"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.momentum, self.z_momentum, self.loss_kind = momentum, z_momentum, loss
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))   # [size, dim]
        self.register_buffer("z", torch.zeros(()))                                  # NCE normaliser Z
        self.register_buffer("z_set", torch.zeros((), dtype=torch.bool))
        # from the run's seed (the engine seeds every worker alike): the negatives' stream, resumed exactly
        self.register_buffer("seed", torch.randint(0, 2**62, ()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._staged: tuple[torch.Tensor, torch.Tensor] | None = None

    def negatives(self, n: int, k: int) -> torch.Tensor:
        """long [n, k]: this rank's rows of the step's global [world * n, k] draw."""
        dev = self.rows.device
        g = torch.Generator(device=dev).manual_seed(int(self.seed) + int(self.steps))
        idx = torch.randint(self.rows.shape[0], (dist.world_size() * n, k), generator=g, device=dev)
        return idx[dist.rank() * n:(dist.rank() + 1) * n]

    def logits(self, f: torch.Tensor, index: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
        """float32 [n, 1 + K]: v.f / tau for each sample's own row (first) and its noise rows. Gradient flows to f
        only: rows are constants."""
        f = f.float()
        with torch.autocast(f.device.type, enabled=False):                   # tau = 0.07 needs float32 scores
            idx = torch.cat([index.view(-1, 1), neg], 1)                     # [n, 1 + K]: the positive first
            if self.rows.shape[0] <= idx.shape[1] * f.shape[1]:              # small bank: score all rows, pick
                s = (f @ self.rows.T).gather(1, idx)
            else:                                                            # large bank: fetch n(1+K) rows
                s = torch.einsum("nd,nkd->nk", f, self.rows[idx])
            return s / tau

    def nce(self, f: torch.Tensor, index: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
        """NCE loss of unit features f [n, d] (the paper's)."""
        logits = self.logits(f, index, neg, tau)
        if not self.z_set or self.z_momentum > 0:  # Z ~ size * E[exp(v.f / tau)] over the global batch
            estimate = dist.all_reduce(logits.detach().exp().mean().view(1), "mean")[0] * self.rows.shape[0]
            m = self.z_momentum if self.z_set else 0.0  # the first batch sets Z (sec. 3.2)
            self.z.copy_(m * self.z + (1 - m) * estimate)
            self.z_set.fill_(True)
        return nce_loss(logits[:, 0], logits[:, 1:], self.z.log(), self.rows.shape[0])

    def softmax(self, f: torch.Tensor, index: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
        """Softmax cross-entropy of each sample's own row against its K noise rows (InfoNCE over the bank): no
        normaliser to estimate."""
        logits = self.logits(f, index, neg, tau)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    def loss(self, f: torch.Tensor, index: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
        """The bank's loss (NCE or softmax, chosen at construction) of unit features f [n, d]."""
        return (self.nce if self.loss_kind == "nce" else self.softmax)(f, index, neg, tau)

    @torch.no_grad()
    def fill(self, f: torch.Tensor, index: torch.Tensor) -> None:
        """Write the global batch's features into their rows outright (a collective: every rank calls it)."""
        f, index = dist.gather(f.detach().float()), dist.gather(index)
        self.rows.index_copy_(0, index, F.normalize(f, dim=1))

    @torch.no_grad()
    def stage(self, f: torch.Tensor, index: torch.Tensor) -> None:
        self._staged = dist.gather(f.detach().float()), dist.gather(index)   # [N, d], [N]: the global batch

    @torch.no_grad()
    def update(self) -> None:
        if self._staged is not None:
            f, index = self._staged
            v = self.momentum * self.rows[index] + (1 - self.momentum) * f
            self.rows.index_copy_(0, index, F.normalize(v, dim=1))
            self._staged = None
        self.steps += 1
