"""Evaluating trained runs: one checkpoint by the chosen protocols (`sslab eval`), or every run under a folder
into one results table (`sslab eval --table`). The protocols themselves live in `sslab.evaluation`."""
from __future__ import annotations

import copy
import glob
import json
import os

import torch

from ..evaluation.knn import eval_split, extract
from ..evaluation.projector import write_projector
from ..evaluation.protocols import PROTOCOLS, EvalTask, run_protocols
from .checkpoint import find_checkpoint, load_trained


def ray_extractor(prepare, tasks: int, batch: int = 512):
    """Features over `tasks` Ray tasks (1 CPU each; the encoder travels through the object store once): that helps
    on a cluster with idle nodes; on one small machine torch's own threads already use every core."""
    import ray

    def run(encoder, images):
        enc = ray.put(copy.deepcopy(encoder).cpu())
        task = ray.remote(num_cpus=1)(_extract_task)
        parts = [task.remote(enc, chunk, prepare, batch) for chunk in images.tensor_split(tasks) if len(chunk)]
        return torch.cat(ray.get(parts))
    return run


def _extract_task(encoder, images, prepare, batch):
    return extract(encoder, images, prepare, batch).cpu()


def evaluate_checkpoint(checkpoint: str, data_dir: str | None = None, protocols=("knn",), labels: str = "10%", *,
                        train_limit: int = 0, test_limit: int = 0, finetune_epochs: int = 0, device: str = "auto",
                        ray_tasks: int = 0, projector: int = 0, logdir: str | None = None, seed: int = 0,
                        log=print) -> dict:
    """Run the chosen protocols on a checkpoint; returns a flat dict of results (top-1 accuracies in [0, 1]).
    kNN uses the run's own monitor settings (engine.knn_k, engine.knn_t)."""
    for p in protocols:
        PROTOCOLS.get(p)                                   # an unknown name fails before the checkpoint loads
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    t = load_trained(checkpoint, data_dir)
    data, m, eng = t.manifest.root, t.manifest, t.spec.engine
    train_x, train_y = eval_split(data, "train", train_limit)
    test_x, test_y = eval_split(data, "test", test_limit)
    if not len(train_x) or not len(test_x):
        raise ValueError(f"{data}: evaluation needs labelled train and test splits")
    task = EvalTask(t.encoder.to(device), train_x, train_y, test_x, test_y, m.num_classes, t.mean, t.std,
                    t.image_size, knn_k=eng.knn_k, knn_t=eng.knn_t, labels=labels, finetune_epochs=finetune_epochs,
                    seed=seed, device=device, log=log)
    if ray_tasks > 1:
        task.extractor = ray_extractor(task.prepare("cpu"), ray_tasks)
    out = {"checkpoint": t.path, "recipe": t.spec.recipe_name, "model": t.spec.model.name, "epochs": t.epoch,
           "data": data, "train_images": len(train_x), "test_images": len(test_x)}
    if {"knn", "linear"} & set(protocols) or projector:
        log(f"[sslab] extracting features of {len(train_x)} + {len(test_x)} images ({t.spec.model.name})")
        task.features("train"), task.features("test")
    out |= run_protocols(task, protocols)
    if projector:
        logdir = logdir or os.path.join(t.run_dir, "tensorboard")
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))[:projector]
        out["projector"] = write_projector(logdir, task.features("test")[pick], test_y[pick], test_x[pick],
                                           m.classes, step=t.epoch)
        log(f"[sslab] embedding projector: {len(pick)} test images -> tensorboard --logdir {logdir}")
    return out


def results_table(runs_dir: str, data_dir: str | None = None, labels: str = "10%", out: str | None = None,
                  log=print, **kw) -> str:
    """Evaluate every run under `runs_dir` (each sub-directory with a checkpoint) by every registered protocol
    (fine-tuning on `labels`), and write a Markdown table (default RUNS_DIR/results.md) plus results.json beside
    it. Returns the Markdown."""
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
        rows.append({"run": name} | evaluate_checkpoint(ckpt, data_dir, PROTOCOLS.names(), labels, log=log, **kw))
    pct = lambda v: f"{100 * v:.2f}" if isinstance(v, float) else "-"
    # a column per top-1 result, in the order the protocols gave them: a new protocol gets its column
    cols = [k for k in rows[0] if k.endswith("_top1") and k != "knn_top1_pixels"]
    diag = [k for k in ("alignment", "uniformity", "effective_rank") if k in rows[0]]   # label-free, not in %
    lines = ["| run | recipe | backbone | epochs | " + " | ".join(k[:-5].replace("_", " ") + " top-1" for k in cols)
             + "".join(f" | {k.replace('_', ' ')}" for k in diag) + " |",
             "|---|---|---|---:|" + "---:|" * (len(cols) + len(diag))]
    lines += [f"| {r['run']} | {r['recipe']} | {r['model']} | {r['epochs']} | "
              + " | ".join(pct(r.get(k)) for k in cols) + "".join(f" | {r[k]:.3f}" for k in diag) + " |"
              for r in rows]
    lines.append("| raw pixels | - | - | - | " + " | ".join(pct(rows[0].get(f"{k}_pixels")) for k in cols)
                 + " | -" * len(diag) + " |")
    md = "\n".join(lines) + "\n"
    out = out or os.path.join(runs_dir, "results.md")
    with open(out, "w") as f:
        f.write(md)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    return md
