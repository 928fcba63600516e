"""The evaluation protocols of `sslab eval`, in a registry: each is one function of an `EvalTask` returning its
results (top-1 accuracies in [0, 1]). Adding a protocol is adding a function here; `sslab eval --protocol` takes
its choices from `PROTOCOLS.names()`. Plain torch: no Ray, no checkpoints (the platform loads those and builds
the task)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..registry import Registry
from .diagnostics import representation_scores, sample_views
from .knn import extract, knn_accuracy, make_prepare
from .probe import balanced_subset, default_epochs, finetune, linear_probe, parse_fraction

PROTOCOLS: Registry[Callable[["EvalTask"], dict]] = Registry("evaluation protocol")


@dataclass
class EvalTask:
    """A frozen encoder and the labelled splits it is scored on."""
    encoder: nn.Module
    train_x: torch.Tensor                 # uint8 [n, C, H, W]
    train_y: torch.Tensor                 # int64 [n]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple                           # the normalisation the encoder was trained with
    std: tuple
    image_size: int                       # the side the encoder was trained on (inputs are resized to it)
    knn_k: int = 200
    knn_t: float = 0.1
    labels: str = "10%"                   # fine-tuning: class-balanced share of the training labels
    finetune_epochs: int = 0              # 0: SimCLR's schedule for that share
    seed: int = 0
    device: str = "cpu"
    log: Callable[[str], None] = print
    # features [n, d] (float, CPU) of uint8 images; None: in this process on `device`. The platform passes one that
    # spreads the rows over Ray tasks
    extractor: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    _features: dict = field(default_factory=dict, repr=False)

    def prepare(self, device=None):
        return make_prepare(self.mean, self.std, self.image_size, device or self.device)

    def features(self, split: str) -> torch.Tensor:
        """Frozen features of the train or test images, computed once."""
        if split not in self._features:
            images = self.train_x if split == "train" else self.test_x
            if self.extractor is not None:
                self._features[split] = self.extractor(self.encoder, images)
            else:
                self._features[split] = extract(self.encoder.to(self.device), images, self.prepare()).cpu()
        return self._features[split]


@PROTOCOLS.register("knn")
def knn(task: EvalTask) -> dict:
    """Weighted kNN top-1 (k = engine.knn_k, T = engine.knn_t, as the training monitor) beside raw pixels."""
    out = {"knn_top1": knn_accuracy(task.features("train"), task.train_y, task.features("test"), task.test_y,
                                    task.num_classes, task.knn_k, task.knn_t),
           "knn_top1_pixels": knn_accuracy(task.train_x.flatten(1).float(), task.train_y,
                                           task.test_x.flatten(1).float(), task.test_y, task.num_classes,
                                           task.knn_k, task.knn_t)}
    task.log(f"[sslab] kNN (k={task.knn_k}, T={task.knn_t}) top-1 {out['knn_top1']:.4f}, "
             f"raw pixels {out['knn_top1_pixels']:.4f}")
    return out


@PROTOCOLS.register("linear")
def linear(task: EvalTask) -> dict:
    """Logistic regression on frozen features, its L2 strength picked on held-out training rows."""
    probe = linear_probe(task.features("train"), task.train_y, task.features("test"), task.test_y, task.num_classes,
                         seed=task.seed)
    task.log(f"[sslab] linear probe top-1 {probe['test_top1']:.4f} (L2 {probe['weight_decay']:g} picked on "
             f"held-out train features: {probe['val_top1']})")
    return {"linear_top1": probe["test_top1"], "linear_weight_decay": probe["weight_decay"]}


@PROTOCOLS.register("finetune")
def finetune_labels(task: EvalTask) -> dict:
    """Encoder + linear head fine-tuned on a class-balanced share of the labels (--labels)."""
    frac = parse_fraction(task.labels)
    idx = balanced_subset(task.train_y.numpy(), frac, task.seed)
    ft = finetune(task.encoder, task.train_x[idx], task.train_y[idx], task.test_x, task.test_y, task.num_classes,
                  task.prepare(), image_size=task.image_size, epochs=task.finetune_epochs or default_epochs(frac),
                  seed=task.seed, device=task.device, log=task.log)
    key = f"finetune_{task.labels if str(task.labels).endswith('%') else f'{100 * frac:g}%'}"
    task.log(f"[sslab] fine-tune on {ft['labelled']} labelled images ({task.labels}), {ft['epochs']} epochs: "
             f"top-1 {ft['test_top1']:.4f}")
    return {f"{key}_top1": ft["test_top1"], f"{key}_labelled": ft["labelled"]}


@PROTOCOLS.register("diagnostics")
def diagnostics(task: EvalTask, sample: int = 1024) -> dict:
    """Alignment, uniformity and effective rank (no labels used) on the first 1,024 test images and one fixed pair
    of views of them, the same for every checkpoint."""
    images = task.test_x[:sample]
    views = sample_views(images, task.image_size, task.seed)
    out = representation_scores(task.encoder.to(task.device), images, views, task.prepare())
    task.log(f"[sslab] alignment {out['alignment']:.4f} (lower: views closer), uniformity {out['uniformity']:.4f} "
             f"(lower: spread wider), effective rank {out['effective_rank']:.1f}")
    return out


def run_protocols(task: EvalTask, names) -> dict:
    """Run the named protocols in the order given; a name not registered fails before any work is done."""
    fns = [PROTOCOLS.get(n) for n in names]
    out: dict = {}
    for fn in fns:
        out |= fn(task)
    return out
