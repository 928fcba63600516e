"""Label-based evaluation of a frozen or fine-tuned encoder: the linear probe and semi-supervised fine-tuning.

Linear probe (the protocol of Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?", used by SimCLR
for its linear evaluation on small data sets): features are extracted once, standardised with the training mean
and std, and a multinomial logistic regression is fitted by full-batch L-BFGS with an L2 penalty whose strength is
picked on a held-out part of the training features; the classifier is then refitted on all training features
with that strength and scored on the test split.

Fine-tuning (SimCLR v1, appendix B.5, the protocol SimCLR v2 keeps for its 1% / 10% label subsets): backbone
plus a new linear head trained on a class-balanced label subset with Nesterov SGD, momentum 0.9, learning rate
0.05 x batch/256, no warm-up and no regularisation at all (no weight decay on the head or the backbone), only
random crop + horizontal flip, 60 epochs for 1% of the labels and 30 for 10% (we also use 30 for more). Ours adds
a cosine decay of the learning rate. SimCLR v2 fine-tunes from the projection head's first layer: recipes that
follow it (simclrv2) put that layer in `encoder()`, so it is fine-tuned here too.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)   # L2 strengths tried, strongest first (warm-started path)


def parse_fraction(labels: str | float) -> float:
    """'10%' -> 0.1, '0.1' -> 0.1; must lie in (0, 1]."""
    text = str(labels).strip()
    try:
        frac = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"--labels must look like 1%, 10%, 100% or a fraction in (0, 1], got {labels!r}") from None
    if not 0 < frac <= 1:
        raise ValueError(f"--labels must be in (0%, 100%], got {labels!r}")
    return frac


def balanced_subset(labels, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced subset: from each class, round(fraction x its count) images (at least one),
    drawn without replacement by a generator seeded with `seed`; sorted. Same seed, same subset."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False))
    return torch.from_numpy(np.sort(np.concatenate(keep)))


# ---- linear probe ------------------------------------------------------------------------------------

def _standardise(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref.mean(0)) / ref.std(0).clamp_min(1e-6)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, max_iter: int = 200,
               init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy(x W + b, y) + wd/2 |W|^2 (bias unpenalised) by L-BFGS with a strong-Wolfe line
    search. x [n, d] float32/float64, y [n] -> W [d, k], b [k]."""
    w = (init[0].clone() if init else x.new_zeros(x.shape[1], num_classes)).requires_grad_(True)
    b = (init[1].clone() if init else x.new_zeros(num_classes)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def _top1(x, y, wb) -> float:
    return ((x @ wb[0] + wb[1]).argmax(1) == y).float().mean().item()


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, weight_decays=WEIGHT_DECAYS,
                 val_fraction: float = 0.2, max_iter: int = 200, seed: int = 0) -> dict:
    """Fit on frozen features, pick the L2 strength on a held-out `val_fraction` of the training rows (class-
    balanced draw), refit on all training rows, report test top-1. Features [n, d]; float64 input stays float64."""
    as_float = (lambda t: t) if train_x.dtype == torch.float64 else (lambda t: t.float())
    train_x, test_x = as_float(train_x.cpu()), as_float(test_x.cpu())
    train_y, test_y = train_y.cpu().long(), test_y.cpu().long()
    val = torch.zeros(len(train_y), dtype=torch.bool)
    val[balanced_subset(train_y.numpy(), val_fraction, seed)] = True
    fit_x, val_x = _standardise(train_x[~val], train_x[~val]), _standardise(train_x[val], train_x[~val])
    sweep, wb, best = {}, None, None
    for wd in sorted(weight_decays, reverse=True):                   # warm start along the path, strong to weak
        wb = fit_logreg(fit_x, train_y[~val], num_classes, wd, max_iter, init=wb)
        sweep[wd] = _top1(val_x, train_y[val], wb)
        if best is None or sweep[wd] > sweep[best]:                 # ties keep the stronger penalty
            best = wd
    all_x, all_test = _standardise(train_x, train_x), _standardise(test_x, train_x)
    wb = fit_logreg(all_x, train_y, num_classes, best, max_iter)
    return {"test_top1": _top1(all_test, test_y, wb), "train_top1": _top1(all_x, train_y, wb),
            "weight_decay": best, "val_top1": {f"{k:g}": v for k, v in sweep.items()}}


# ---- semi-supervised fine-tuning ---------------------------------------------------------------------

def default_epochs(fraction: float) -> int:
    """SimCLR's schedule: 60 epochs on 1% of the labels, 30 on 10% (and, our choice, on more)."""
    return 60 if fraction <= 0.01 else 30


@torch.no_grad()
def _out_dim(module: nn.Module, images: torch.Tensor, prepare) -> int:
    was = module.training
    module.eval()
    d = module(prepare(images[:2])).shape[1]
    module.train(was)
    return d


def finetune(encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
             test_labels: torch.Tensor, num_classes: int, prepare, *, image_size: int, epochs: int,
             batch_size: int = 256, lr: float | None = None, min_scale: float = 0.5, seed: int = 0,
             device="cpu", log=None) -> dict:
    """Fine-tune a copy of `encoder` + a zero-initialised linear head on uint8 `images` [n, C, H, W] with `labels`
    (the caller picks the subset), augmenting each batch with a random resized crop (area `min_scale`..1 of the
    image; milder than ImageNet's 0.08 because these images are tiny) and a flip. Returns test top-1 and settings."""
    from ..datasets.views import ViewSpec, augment, uniforms, view_key

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(encoder).to(device)
    for p in net.parameters():
        p.requires_grad_(True)                       # frozen-during-pretraining parts are fine-tuned too
    head = nn.Linear(_out_dim(net, images, prepare), num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(net, head)
    batch = max(2, min(batch_size, len(images)))     # BatchNorm needs 2 rows
    lr = lr if lr is not None else 0.05 * batch / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    spec = ViewSpec(image_size, scale=(min_scale, 1.0), jitter_p=0.0, gray_p=0.0)
    steps_per_epoch = max(1, len(images) // batch)  # the last short batch of an epoch is dropped
    total, step = epochs * steps_per_epoch, 0
    labels = labels.long()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            x = prepare(augment(images[idx], spec, uniforms(view_key(seed, epoch), idx, 0)))
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item()
        if log and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            log(f"[sslab] fine-tune epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f}")
    model.eval()
    with torch.no_grad():
        correct = sum((model(prepare(test_images[i:i + 512])).argmax(1).cpu() == test_labels[i:i + 512]).sum().item()
                      for i in range(0, len(test_images), 512))
    return {"test_top1": correct / max(1, len(test_images)), "labelled": len(images), "epochs": epochs,
            "batch_size": batch, "lr": lr, "steps": total}
