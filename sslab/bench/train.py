"""`sslab bench train`: the full engine against the bare loop, side by side in one run.

Steps/s of the full engine (`launch.train`: Ray Train, the data stream, the recipe, per-epoch checkpoint and report;
kNN monitor off) against the bare loop: the engine's own setup (`loop.Trainer` in a `LocalContext`) and its
`train_step`, on views made once beforehand, with no stream, callbacks, reports or checkpoints. Both take the same
recipe, optimizer, schedule, clipping, batch and thread count; with `workers` > 1 both run that many processes
(the bare loop under torch's own launcher, torchrun, over gloo). Half the bare loop's timed steps run before the
engine and half after, so drift in outside load hits both. Both exclude start-up: the bare loop times the steps
after its first `warmup`; the engine, from its 2nd epoch on, the steps after the first of each epoch (its
`steady_images_per_s`), so the per-epoch restart of the data stream is left out too. Reported beside it: the
engine's whole-epoch images_per_s (restart included) and the rate between the reports of epoch 1 and the last
epoch, timed in the Ray Train controller (reporting and checkpointing included).

    python -m torch.distributed.run --nproc-per-node N -m sslab.bench.train SPEC_JSON STEPS WARMUP THREADS
runs the bare loop alone (what `bench_train` starts for N > 1); rank 0 prints its steps/s as the last line.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

from ..datasets.shards import load_split
from ..datasets.views import make_views, view_key
from ..platform.context import LocalContext
from ..platform.loop import Trainer, train_step
from ..platform.spec import RunSpec
from .measure import machine, save_json, sig

try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # older Ray: the callback is only a timing aid
    _UserCallback = object


class ReportTimes(_UserCallback):
    """Ray Train callback (runs in the controller): appends "wall time, epoch, step, images_per_s" per report."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "epoch": m.get("epoch"), "step": m.get("step"),
                                "images_per_s": m.get("images_per_s"),
                                "steady_images_per_s": m.get("steady_images_per_s"),
                                "data_wait_frac": m.get("data_wait_frac")}) + "\n")


def bare_steps(spec: RunSpec, batches: list[dict], steps: int, device: str = "cpu") -> tuple[list[float], list[float]]:
    """`steps` training steps of `spec`'s run on `batches` (cycled; each as the stream gives it: uint8 view columns,
    or with `data.augment=worker` uint8 "image"s, whose views the loop's data stage makes on the device every step;
    "index", "label"), through the engine's setup, data stage and `train_step` and nothing else. Returns each
    step's loss and the time (perf_counter) at its end."""
    cycled = lambda size: (batches[i % len(batches)] for i in range(steps))
    trainer = Trainer(spec, LocalContext(cycled, device=device))
    trainer.setup()
    trainer.resume()                       # no checkpoint to find: wraps the model as the engine does
    trainer.parts.model.train()
    losses, times = [], []
    for i, (views, batch, _) in enumerate(trainer.stream(epoch=0)):
        out = train_step(trainer.parts, views, batch, i)
        losses.append(out.loss.item())
        times.append(time.perf_counter())
    return losses, times


def preloaded_batches(spec: RunSpec, rank: int = 0, world: int = 1, groups: int = 4, device: str = "cpu"
                      ) -> list[dict]:
    """`groups` batches of this rank's share of the global batch, on `device`: with views made by the worker
    (`data.augment`), the uint8 images (the loop makes their views every step, as the engine's worker does);
    otherwise views made once (so the bare loop times steps, not data)."""
    from ..recipes import registry
    from ..datasets.shards import read_manifest

    manifest = read_manifest(spec.data.path)
    viewset = registry.get(spec.recipe_name).views(spec.recipe, spec.data, spec.data.crop_size or
                                                    manifest.image_size[0])
    local = spec.engine.batch_size // world
    images, labels, index = load_split(spec.data.path, "train", groups * local)
    out = []
    for g in range(len(images) // local):
        rows = slice(g * local, (g + 1) * local)
        batch = {"index": torch.from_numpy(index[rows]), "label": torch.from_numpy(labels[rows])}
        if spec.data.augment == "worker":
            batch["image"] = torch.from_numpy(images[rows])
        else:
            batch |= make_views(images[rows], viewset, view_key(spec.engine.seed, 0), index[rows])
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def view_cost_ms(spec: RunSpec, device: str, reps: int = 20) -> float:
    """Milliseconds to make one local batch's views on `device` (the worker's share of each step when views are
    made there), timed with the device synchronised before and after."""
    from ..recipes import registry

    batch = preloaded_batches(spec, groups=1, device=device)[0]
    if "image" not in batch:
        return float("nan")
    image = batch["image"]
    viewset = registry.get(spec.recipe_name).views(spec.recipe, spec.data, spec.data.crop_size or image.shape[-1])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    make_views(image, viewset, 0, batch["index"])
    sync()
    t = time.perf_counter()
    for k in range(reps):
        make_views(image, viewset, k, batch["index"])
    sync()
    return 1000 * (time.perf_counter() - t) / reps


def bare_rate(spec: RunSpec, steps: int, warmup: int, threads: int, device: str = "cpu") -> float:
    """Steps/s of the bare loop in this process (one rank of a group when torch.distributed is initialised),
    timing the steps after the first `warmup` (at least one)."""
    from .. import dist

    warmup = max(1, warmup)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = preloaded_batches(spec, dist.rank(), dist.world_size(), device=device)
        _, times = bare_steps(spec, batches, warmup + steps, device)
    finally:
        torch.set_num_threads(saved)
    return steps / (times[-1] - times[warmup - 1])


def _bare_torchrun(spec: RunSpec, steps: int, warmup: int, threads: int, world: int) -> float:
    """The bare loop in `world` processes started by torchrun; rank 0's steps/s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m",
           "sslab.bench.train", json.dumps(spec.to_dict()), str(steps), str(warmup), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"the bare loop under torchrun failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def bench_train(data_dir: str, *, recipe: str = "simclr", overrides: dict | None = None, batch: int = 256,
                workers: int = 1, cpus_per_worker: float = 1.0, epochs: int = 2, steps: int = 30,
                warmup: int = 3, gpu: bool = False, smoke: bool = False, out: str | None = None, log=print) -> dict:
    """See the module docstring. `gpu`: one GPU per worker for both, bf16 autocast, channels-last (the engine's
    GPU settings; views made on the GPU unless `data.augment=pipeline` is among the overrides); the bare loop
    runs in this process (workers must be 1)."""
    if gpu and workers != 1:
        raise ValueError("bench train --gpu compares one GPU worker with the bare loop on the same GPU: workers=1")
    device = "cuda" if gpu else "cpu"
    import ray

    from ..platform.launch import train
    from ..platform.spec import make_spec

    flat = {"data.path": data_dir, "engine.batch_size": batch, "engine.workers": workers,
            "engine.cpus_per_worker": cpus_per_worker, "engine.epochs": epochs, "engine.steps_per_epoch": steps,
            "engine.knn_every": 0, "engine.collapse_threshold": 0.0, "engine.diagnostics": 0, "engine.log_every": max(1, steps // 3),
            "data.limit": steps * batch} | (
                {"engine.use_gpu": True, "engine.amp": True, "engine.channels_last": True} if gpu else {}) | (
                overrides or {})
    spec = make_spec(recipe, flat)
    threads = max(1, math.floor(cpus_per_worker))   # what Ray gives a Train worker: OMP_NUM_THREADS=floor(CPUs)
    result = {"benchmark": "train", "smoke": smoke, "machine": machine(), "data": spec.data.path, "recipe": recipe,
              "model": spec.model.name, "batch": batch, "workers": workers, "threads_per_worker": threads,
              "epochs": epochs, "steps_per_epoch": steps, "bare_steps": steps, "warmup_steps": warmup,
              "overrides": {k: v for k, v in flat.items() if k != "data.path"}}

    def time_bare(n: int) -> float:                       # seconds for n timed steps, after `warmup` untimed ones
        if workers > 1:
            return n / _bare_torchrun(spec, n, warmup, threads, workers)
        return n / bare_rate(spec, n, warmup, threads, device)

    bare_steps_split = (steps // 2, steps - steps // 2)
    bare_s = [time_bare(bare_steps_split[0])]
    was_running = ray.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        times_path = os.path.join(tmp, "reports.jsonl")
        t0 = time.time()
        res = train(spec, name="bench-train", storage=os.path.join(tmp, "runs"), callbacks=[ReportTimes(times_path)])
        wall = time.time() - t0
        if res.error:
            raise RuntimeError(f"the engine run failed: {res.error}")
        with open(times_path) as f:
            reports = [json.loads(line) for line in f]
    if not was_running:
        ray.shutdown()                                # the bare loop's second half gets the machine to itself
    if len(reports) < 2:
        raise ValueError("bench train needs epochs >= 2: steady state is measured from the second epoch on")
    span = reports[-1]["t"] - reports[0]["t"]
    whole = (reports[-1]["step"] - reports[0]["step"]) / span
    in_epoch = sum(r["images_per_s"] for r in reports[1:]) / (len(reports) - 1) / batch
    engine = sum(r["steady_images_per_s"] for r in reports[1:]) / (len(reports) - 1) / batch
    bare_s.append(time_bare(bare_steps_split[1]))
    bare = steps / sum(bare_s)
    result.update({
        "engine_steps_per_s": sig(engine), "engine_measure": "epochs 2+, after each epoch's first step",
        "engine_in_epoch_steps_per_s": sig(in_epoch), "engine_with_reports_steps_per_s": sig(whole),
        "engine_wall_s": sig(wall),
        "engine_data_wait_frac": sig(sum(r["data_wait_frac"] for r in reports[1:]) / (len(reports) - 1)),
        "bare_steps_per_s": sig(bare),
        "bare_before_after_steps_per_s": [sig(n / t) for n, t in zip(bare_steps_split, bare_s)],
        "ratio": sig(engine / bare),
        "ratio_in_epoch": sig(in_epoch / bare), "ratio_with_reports": sig(whole / bare), "reports": reports,
        "engine_images_per_s": sig(engine * batch), "engine_in_epoch_images_per_s": sig(in_epoch * batch),
        "device": device, "views_on_device_ms_per_batch": sig(view_cost_ms(spec, device)),
        "goal": {"engine_vs_bare_at_least": 0.9, "met": engine / bare >= 0.9}})
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    log(f"[sslab] steps/s: engine {engine:.3f} after the first step of each epoch ({in_epoch:.3f} whole epochs, "
        f"{whole:.3f} with reports and checkpoints); bare loop {bare:.3f}; ratio {engine / bare:.3f}")
    return save_json(result, out)


if __name__ == "__main__":  # one rank of the bare loop under torchrun (see the module docstring)
    import torch.distributed as tdist

    spec_json, n_steps, n_warmup, n_threads = sys.argv[1:5]
    tdist.init_process_group("gloo")
    try:
        rate = bare_rate(RunSpec.from_dict(json.loads(spec_json)), int(n_steps), int(n_warmup), int(n_threads))
    finally:
        tdist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(rate, flush=True)
