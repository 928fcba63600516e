"""Frozen-feature evaluation: the weighted kNN monitor (Wu et al. 2018, InstDisc) and feature extraction."""
from __future__ import annotations

import copy
import functools
import glob
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..datasets.views import normalize
from .. import dist


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


def knn_accuracy(bank_feats, bank_labels, query_feats, query_labels, num_classes, k, t) -> float:
    pred = knn_predict(query_feats, bank_feats, bank_labels.to(bank_feats.device), num_classes, k, t)
    return (pred.cpu() == query_labels.cpu()).float().mean().item()


def pixel_knn(data_dir: str, num_classes: int, bank: int, queries: int, k: int, t: float) -> float:
    """The raw-pixel baseline: the same kNN on flattened pixels (what any learned feature must beat)."""
    bx, by = eval_split(data_dir, "train", bank)
    qx, qy = eval_split(data_dir, "test", queries)
    return knn_accuracy(bx.flatten(1).float(), by, qx.flatten(1).float(), qy, num_classes, k, t)


# ---- trained checkpoints ----------------------------------------------------------------------------

@dataclass
class Trained:
    """A checkpoint's encoder, ready to evaluate: `prepare(x)` maps uint8 [n, C, H, W] to the normalised,
    resized float input the encoder was trained on."""
    path: str                 # the checkpoint directory
    run_dir: str              # the run directory holding it (TensorBoard lives there)
    spec: object              # RunSpec
    epoch: int                # epochs trained
    recipe: torch.nn.Module
    encoder: torch.nn.Module
    manifest: object          # the evaluation data's Manifest
    image_size: int
    mean: tuple
    std: tuple

    def prepare(self, device="cpu"):
        return make_prepare(self.mean, self.std, self.image_size, device)


def find_checkpoint(path: str) -> str:
    """`path` is a checkpoint directory (holds state.pt) or a run directory: its latest checkpoint_* (Ray names
    them checkpoint_<date>_<time>, so name order is time order)."""
    from .engine import STATE_FILE

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    found = sorted(d for d in glob.glob(os.path.join(path, "checkpoint_*"))
                   if os.path.isfile(os.path.join(d, STATE_FILE)))
    if not found:
        raise FileNotFoundError(f"{path} holds neither {STATE_FILE} nor checkpoint_*/{STATE_FILE}: pass a checkpoint "
                                f"directory or a run directory made by `sslab train`")
    return found[-1]


def load_trained(checkpoint: str, data_dir: str | None = None) -> Trained:
    """Rebuild a run's recipe from its checkpoint (weights loaded strictly) and take `recipe.encoder()`.
    `data_dir` is the evaluation data (default: the run's own). The recipe is built against the training data's
    manifest when it is still there (memory banks are sized by it), else against the evaluation data's."""
    from ..datasets.shards import read_manifest
    from .engine import build_recipe, load_state
    from .spec import RunSpec

    path = find_checkpoint(checkpoint)
    state = load_state(path)
    spec = RunSpec.from_dict(state["spec"])
    data = data_dir or spec.data.path
    if not data:
        raise ValueError(f"{path}: the run names no data directory; pass --data DIR")
    manifest = read_manifest(data)
    train_manifest = read_manifest(spec.data.path) if os.path.isfile(os.path.join(spec.data.path, "manifest.json")) \
        else manifest
    size = spec.data.crop_size or train_manifest.image_size[0]
    if manifest.channels != train_manifest.channels:
        raise ValueError(f"{data} has {manifest.channels}-channel images; the encoder was trained on "
                         f"{train_manifest.channels} channels")
    recipe = build_recipe(spec, train_manifest, size)
    recipe.load_state_dict(state["recipe"])
    recipe.eval()
    parent = os.path.dirname(os.path.abspath(path))
    run_dir = parent if os.path.basename(os.path.abspath(path)).startswith("checkpoint_") else os.path.abspath(path)
    return Trained(path, run_dir, spec, state["epoch"] + 1, recipe, recipe.encoder(), manifest, size,
                   tuple(train_manifest.mean), tuple(train_manifest.std))


def make_prepare(mean, std, size: int, device="cpu"):
    """uint8 [n, C, H, W] -> normalised float [n, C, size, size] on `device` (bilinear resize, as the engine's
    kNN monitor does, when the images are not `size` already)."""
    def prepare(x):
        x = normalize(x.to(device), mean, std)
        return F.interpolate(x, size=size, mode="bilinear") if x.shape[-1] != size else x
    return prepare


def features(encoder, images: torch.Tensor, prepare, batch: int = 512, ray_tasks: int = 0) -> torch.Tensor:
    """Frozen features [n, d] (float32, CPU) of uint8 `images`, in order. `ray_tasks` > 1 splits the rows over that
    many Ray tasks (1 CPU each; the encoder travels through the object store once): that helps on a cluster with
    idle nodes; on one small machine torch's own threads already use every core, so the default is in-process."""
    if ray_tasks <= 1:
        return extract(encoder, images, prepare, batch).cpu()
    import ray

    enc = ray.put(copy.deepcopy(encoder).cpu())
    task = ray.remote(num_cpus=1)(_extract_task)
    parts = [task.remote(enc, chunk, prepare, batch) for chunk in images.tensor_split(ray_tasks) if len(chunk)]
    return torch.cat(ray.get(parts))


def _extract_task(encoder, images, prepare, batch):
    return extract(encoder, images, prepare, batch).cpu()


def write_projector(log_dir: str, feats: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                    class_names=(), tag: str = "sslab_eval", step: int = 0) -> str:
    """TensorBoard's embedding projector: `feats` [n, d] with class-name labels and uint8 `images` [n, C, H, W]
    as thumbnails (grey images are shown as RGB). Returns the directory written."""
    from torch.utils.tensorboard import SummaryWriter

    thumbs = images.float().div(255)
    if thumbs.shape[1] == 1:
        thumbs = thumbs.expand(-1, 3, -1, -1)
    names = [class_names[y] if 0 <= y < len(class_names) else str(y) for y in labels.tolist()]
    with SummaryWriter(log_dir) as w:
        w.add_embedding(feats.float(), metadata=names, label_img=thumbs, global_step=step, tag=tag)
    return log_dir


# ---- the `sslab eval` protocols ------------------------------------------------------------------------

PROTOCOLS = ("knn", "linear", "finetune")


def evaluate_checkpoint(checkpoint: str, data_dir: str | None = None, protocols=("knn",), labels: str = "10%", *,
                        train_limit: int = 0, test_limit: int = 0, finetune_epochs: int = 0, device: str = "auto",
                        ray_tasks: int = 0, projector: int = 0, logdir: str | None = None, seed: int = 0,
                        log=print) -> dict:
    """Run the chosen protocols on a checkpoint; returns a flat dict of results (top-1 accuracies in [0, 1]).
    kNN: the engine monitor's weighted vote (engine.knn_k, engine.knn_t) plus the raw-pixel baseline beside it."""
    from .probe import balanced_subset, default_epochs, finetune, linear_probe, parse_fraction

    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown protocol {bad[0]!r}; choose from {', '.join(PROTOCOLS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    t = load_trained(checkpoint, data_dir)
    data, m, eng = t.manifest.root, t.manifest, t.spec.engine
    train_x, train_y = eval_split(data, "train", train_limit)
    test_x, test_y = eval_split(data, "test", test_limit)
    if not len(train_x) or not len(test_x):
        raise ValueError(f"{data}: evaluation needs labelled train and test splits")
    out = {"checkpoint": t.path, "recipe": t.spec.recipe_name, "model": t.spec.model.name, "epochs": t.epoch,
           "data": data, "train_images": len(train_x), "test_images": len(test_x)}
    t.encoder.to(device)
    prepare = t.prepare("cpu" if ray_tasks > 1 else device)
    if {"knn", "linear"} & set(protocols) or projector:
        log(f"[sslab] extracting features of {len(train_x)} + {len(test_x)} images ({t.spec.model.name})")
        train_f = features(t.encoder, train_x, prepare, ray_tasks=ray_tasks)
        test_f = features(t.encoder, test_x, prepare, ray_tasks=ray_tasks)
    if "knn" in protocols:
        out["knn_top1"] = knn_accuracy(train_f, train_y, test_f, test_y, m.num_classes, eng.knn_k, eng.knn_t)
        out["knn_top1_pixels"] = knn_accuracy(train_x.flatten(1).float(), train_y, test_x.flatten(1).float(),
                                              test_y, m.num_classes, eng.knn_k, eng.knn_t)
        log(f"[sslab] kNN (k={eng.knn_k}, T={eng.knn_t}) top-1 {out['knn_top1']:.4f}, "
            f"raw pixels {out['knn_top1_pixels']:.4f}")
    if "linear" in protocols:
        probe = linear_probe(train_f, train_y, test_f, test_y, m.num_classes, seed=seed)
        out["linear_top1"], out["linear_weight_decay"] = probe["test_top1"], probe["weight_decay"]
        log(f"[sslab] linear probe top-1 {probe['test_top1']:.4f} (L2 {probe['weight_decay']:g} picked on "
            f"held-out train features: {probe['val_top1']})")
    if "finetune" in protocols:
        frac = parse_fraction(labels)
        idx = balanced_subset(train_y.numpy(), frac, seed)
        ft = finetune(t.encoder, train_x[idx], train_y[idx], test_x, test_y, m.num_classes, t.prepare(device),
                      image_size=t.image_size, epochs=finetune_epochs or default_epochs(frac), seed=seed,
                      device=device, log=log)
        key = f"finetune_{labels if str(labels).endswith('%') else f'{100 * frac:g}%'}"
        out[f"{key}_top1"], out[f"{key}_labelled"] = ft["test_top1"], ft["labelled"]
        log(f"[sslab] fine-tune on {ft['labelled']} labelled images ({labels}), {ft['epochs']} epochs: "
            f"top-1 {ft['test_top1']:.4f}")
    if projector:
        logdir = logdir or os.path.join(t.run_dir, "tensorboard")
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))[:projector]
        out["projector"] = write_projector(logdir, test_f[pick], test_y[pick], test_x[pick], m.classes,
                                           step=t.epoch)
        log(f"[sslab] embedding projector: {len(pick)} test images -> tensorboard --logdir {logdir}")
    return out


def results_table(runs_dir: str, data_dir: str | None = None, labels: str = "10%", out: str | None = None,
                  log=print, **kw) -> str:
    """Evaluate every run under `runs_dir` (each sub-directory with a checkpoint) by kNN, linear probe and
    fine-tuning on `labels`, and write a Markdown table (default RUNS_DIR/results.md) plus results.json beside it.
    Returns the Markdown."""
    import json

    runs = []
    for d in sorted(glob.glob(os.path.join(runs_dir, "*"))):
        try:
            runs.append((os.path.basename(d), find_checkpoint(d)))
        except FileNotFoundError:
            continue
    if not runs:
        raise FileNotFoundError(f"{runs_dir}: no run directory with a checkpoint inside")
    rows = []
    for name, ckpt in runs:
        log(f"[sslab] evaluating {ckpt}")
        rows.append({"run": name} | evaluate_checkpoint(ckpt, data_dir, PROTOCOLS, labels, log=log, **kw))
    pct = lambda v: f"{100 * v:.2f}" if isinstance(v, float) else "-"
    ft = f"finetune_{labels}_top1"
    lines = [f"| run | recipe | backbone | epochs | kNN top-1 | linear top-1 | fine-tune {labels} top-1 |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['recipe']} | {r['model']} | {r['epochs']} "
              f"| {pct(r.get('knn_top1'))} | {pct(r.get('linear_top1'))} | {pct(r.get(ft))} |" for r in rows]
    lines.append(f"| raw pixels | - | - | - | {pct(rows[0].get('knn_top1_pixels'))} | - | - |")
    md = "\n".join(lines) + "\n"
    out = out or os.path.join(runs_dir, "results.md")
    with open(out, "w") as f:
        f.write(md)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    return md
