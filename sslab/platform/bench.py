"""`sslab bench data|train`: throughput measured side by side in one run, printed as a table and written as JSON.

data: images/s of the Ray Data multi-view pipeline (`datasets.pipeline.train_dataset`, unchanged) against a
  `torch.utils.data.DataLoader` over the same shard files with the same number of CPU workers, decoding the same
  PNG bytes with PIL and augmenting image by image with torchvision.transforms.v2 (the ViewSpec's crop, flip,
  jitter, grayscale, blur, solarize); a third row runs our batched tensor augmentation (the pipeline's own map
  function) inside the DataLoader, so the reader sees how much of the gain is the augmentation and how much Ray.
  A pass is one epoch; "images/s" counts from the start of iteration to the last batch (the pipeline's start
  included: it recurs every epoch), "steady" from the first batch on. Each loader makes `repeats` passes,
  interleaved with the others' so a burst of outside load hits all alike; the best is reported. Ray's first pass
  at each CPU count is reported apart ("first_pass"; the very first also starts Ray's worker processes). One
  local Ray serves every CPU count: the decode/augment tasks reserve CPUs so that at most that many run at once.
  Memory: peak PSS and RSS of this process tree (the driver, Ray's daemons and workers; PSS shares shared pages
  out fairly, so the object store is counted once) while the pipeline streams one shard file, then the same file
  listed 10 times.
train: steps/s of the full engine (`launch.train`: Ray Train, the data stream, the recipe, per-epoch checkpoint
  and report; kNN monitor off) against a bare PyTorch loop with the same recipe (model + loss), optimizer, batch
  and thread count on views made once beforehand, the same process count (DDP over gloo when > 1), half its timed
  steps before the engine run and half after. Both exclude start-up: the bare loop times the steps after its
  first `warmup`; the engine, from its 2nd epoch on, the steps after the first of each epoch (the engine's
  `steady_images_per_s`), so the per-epoch restart of the data stream is left out too. Reported beside it: the
  engine's whole-epoch images_per_s (restart included) and the rate between the reports of epoch 1 and the last
  epoch, timed in the Ray Train controller (reporting and checkpointing included).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import platform
import tempfile
import threading
import time

import torch

from ..datasets.shards import ShardFile, load_split, read_manifest
from ..datasets.views import blur_kernel_size, make_views, normalize

# ---- measuring ---------------------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import ray

    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(), "platform": platform.platform(),
            "torch": torch.__version__, "ray": ray.__version__, "load_avg_1m": round(os.getloadavg()[0], 2),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def tree_memory(root: int | None = None) -> tuple[int, int, int]:
    """(RSS, PSS, processes): bytes summed over `root` (default: this process) and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    rss = pss = n = 0
    todo = [root or os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        n += 1
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Rss:", "Pss:")):
                        kb = int(line.split()[1]) * 1024
                        rss, pss = (rss + kb, pss) if line.startswith("Rss:") else (rss, pss + kb)
        except OSError:
            continue
    return rss, pss, n


class PeakMemory:
    """Samples `tree_memory` every `every` seconds in a thread while the block runs: .peak_rss, .peak_pss and
    .procs (processes in the tree at the PSS peak)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_rss, self.peak_pss, self.procs, self.samples = every, 0, 0, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            rss, pss, n = tree_memory()
            if pss > self.peak_pss:
                self.peak_pss, self.procs = pss, n
            self.peak_rss = max(self.peak_rss, rss)
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_pass(batches) -> dict:
    """One pass over an iterable of batch dicts (with "index"): totals and the rate after the first batch."""
    t0 = time.perf_counter()
    n = n_first = 0
    t_first = None
    for b in batches:
        k = len(b["index"])
        n += k
        if t_first is None:
            t_first, n_first = time.perf_counter(), k
    total = time.perf_counter() - t0
    steady = (n - n_first) / (t0 + total - t_first) if t_first and n > n_first else float("nan")
    return {"images": n, "seconds": _sig(total), "images_per_s": _sig(n / total),
            "first_batch_s": _sig((t_first or t0) - t0), "steady_images_per_s": _sig(steady)}


def _sig(x: float, digits: int = 4) -> float:
    """A figure rounded to `digits` significant digits (a rate of 0.0004 keeps its meaning)."""
    return float(f"{x:.{digits}g}")


def _save(result: dict, out: str | None) -> dict:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


# ---- data --------------------------------------------------------------------------------------------

def torchvision_views(viewset, channels: int):
    """Per-image torchvision.transforms.v2 pipelines equivalent to each ViewSpec of `viewset`, on PIL images
    (PIL's resize antialiases; our batched crop does not: see sslab.datasets.views)."""
    from torchvision.transforms import v2

    out = []
    for _, s in viewset.views:
        st = s.strength
        ops = [v2.RandomResizedCrop(s.size, scale=s.scale, ratio=s.ratio), v2.RandomHorizontalFlip(s.flip_p)]
        if s.jitter_p and st:
            ops.append(v2.RandomApply([v2.ColorJitter(s.brightness * st, s.contrast * st, s.saturation * st,
                                                      s.hue * st)], p=s.jitter_p))
        if s.gray_p and channels == 3:
            ops.append(v2.RandomGrayscale(s.gray_p))
        if s.blur_p:
            ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(s.size), s.blur_sigma)], p=s.blur_p))
        if s.solarize_p:
            ops.append(v2.RandomSolarize(128, p=s.solarize_p))
        out.append(v2.Compose(ops + [v2.PILToTensor()]))
    return out


class PerImageViews(torch.utils.data.Dataset):
    """What a user would write: decode one PNG with PIL, run each view's torchvision.v2 pipeline on it."""

    def __init__(self, pngs, labels, channels, viewset):
        self.pngs, self.labels, self.mode = pngs, labels, {1: "L", 3: "RGB"}[channels]
        self.columns, self.tfs = viewset.columns, torchvision_views(viewset, channels)

    def __len__(self):
        return len(self.pngs)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(io.BytesIO(self.pngs[i])) as im:
            im = im.convert(self.mode)
        out = {c: tf(im) for c, tf in zip(self.columns, self.tfs)}
        return out | {"index": i, "label": self.labels[i]}


class BatchedViews(torch.utils.data.Dataset):
    """The Ray pipeline's own map function (`MakeViews`: batch decode + batched tensor augmentation), one batch
    per item, inside a DataLoader."""

    def __init__(self, pngs, labels, channels, viewset, batch):
        from ..datasets.pipeline import MakeViews

        self.pngs, self.labels, self.batch = pngs, labels, batch
        self.fn = MakeViews(viewset, channels)

    def __len__(self):
        return math.ceil(len(self.pngs) / self.batch)

    def __getitem__(self, b):
        rows = slice(b * self.batch, (b + 1) * self.batch)
        out = self.fn({"image": self.pngs[rows], "index": range(len(self.pngs))[rows],
                       "label": self.labels[rows]})
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _read_bytes(files) -> tuple[list[bytes], list[int]]:
    import pyarrow.parquet as pq

    pngs, labels = [], []
    for path in files:
        t = pq.read_table(path, columns=["image", "label"])
        pngs += t.column("image").to_pylist()
        labels += t.column("label").fill_null(-1).to_pylist()
    return pngs, labels


def _with_files(manifest, files):
    return dataclasses.replace(manifest, splits={"train": tuple(files)})


def _ray_pass(cfg, manifest, viewset, batch: int) -> dict:
    from ..datasets.pipeline import train_dataset

    ds = train_dataset(cfg, manifest, viewset)
    return time_pass(ds.iter_torch_batches(batch_size=batch))


def _start_ray(cpus: int) -> bool:
    """A local Ray with `cpus` logical CPUs, unless one is running (tests). Returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def _per_task(cpus: int) -> float:
    """Logical CPUs per decode/augment task such that at most `cpus` of them run at once on this Ray."""
    import ray

    return ray.cluster_resources()["CPU"] / cpus


def bench_data(data_dir: str, *, recipe: str = "simclr", images: int = 20000, cpus=(1, 2), batch: int = 256,
               repeats: int = 2, rss_scale: int = 10, smoke: bool = False, out: str | None = None, log=print) -> dict:
    """See the module docstring. `images`: rows used (whole shard files, at least this many). Each loader makes
    `repeats` passes, interleaved with the others', and its best pass is reported (all passes are in the JSON);
    Ray's first pass at each CPU count is reported apart."""
    import ray

    from ..recipes import registry
    from .spec import make_spec

    spec = make_spec(recipe, {"data.path": data_dir, "data.batch_rows": batch})
    manifest = read_manifest(spec.data.path)
    size = spec.data.crop_size or manifest.image_size[0]
    viewset = registry.get(recipe).views(spec.recipe, spec.data, size)
    files, n = [], 0
    for f in manifest.splits["train"]:
        if n >= images:
            break
        files.append(f)
        n += f.rows
    pngs, labels = _read_bytes([f.path for f in files])
    sub = _with_files(manifest, files)
    result = {"benchmark": "data", "smoke": smoke, "machine": machine(), "data": spec.data.path, "recipe": recipe,
              "views": [f"{c}: {s.size}px" for c, s in viewset.views], "batch": batch, "images": n, "repeats": repeats,
              "shard_files": len(files), "rows": [], "ratios": {}}
    per_image = PerImageViews(pngs, labels, manifest.channels, viewset)
    batched = BatchedViews(pngs, labels, manifest.channels, viewset, batch)
    started = _start_ray(max(cpus))                     # one Ray for all: starting one is slow on a busy box
    for c in cpus:
        cfg = dataclasses.replace(spec.data, cpus_per_task=_per_task(c))
        first = _ray_pass(cfg, sub, viewset, batch)  # (the very first pass also starts Ray's worker processes)
        loaders = {
            "ray_data": lambda: _ray_pass(cfg, sub, viewset, batch),
            "dataloader_per_image": lambda: time_pass(torch.utils.data.DataLoader(
                per_image, batch_size=batch, shuffle=True, num_workers=c)),
            "dataloader_batched": lambda: time_pass(torch.utils.data.DataLoader(
                batched, batch_size=None, shuffle=True, num_workers=c))}
        passes: dict[str, list] = {k: [] for k in loaders}
        for _ in range(repeats):                       # interleaved: a burst of outside load hits every loader
            for k, run in loaders.items():
                passes[k].append(run())
        rows = [{"loader": k, "cpus": c, "passes": [p["images_per_s"] for p in ps]} |
                max(ps, key=lambda p: p["images_per_s"]) for k, ps in passes.items()]
        rows[0]["first_pass"] = first
        for r in rows:
            log(f"[sslab] {r['loader']:22s} {c} CPU: {r['images_per_s']:>9,.0f} img/s "
                f"(steady {r['steady_images_per_s']:,.0f}, first batch {r['first_batch_s']:.2f} s; passes "
                f"{', '.join(f'{x:,.0f}' for x in r['passes'])})")
        log(f"[sslab] ray_data first pass     {c} CPU: {first['images_per_s']:>9,.0f} img/s "
            f"(first batch {first['first_batch_s']:.2f} s)")
        result["rows"] += rows
        ray_r, pil, bat = rows
        result["ratios"][str(c)] = {
            "ray_vs_dataloader": _sig(ray_r["images_per_s"] / pil["images_per_s"]),
            "ray_first_pass_vs_dataloader": _sig(first["images_per_s"] / pil["images_per_s"]),
            "ray_vs_dataloader_steady": _sig(ray_r["steady_images_per_s"] / pil["steady_images_per_s"]),
            "batched_dataloader_vs_dataloader": _sig(bat["images_per_s"] / pil["images_per_s"]),
            "ray_vs_batched_dataloader": _sig(ray_r["images_per_s"] / bat["images_per_s"])}
    result["memory"] = _bench_memory(spec, manifest, viewset, max(cpus), batch, rss_scale, log, warm=not smoke)
    if started:
        ray.shutdown()
    result["goal"] = {"ray_vs_dataloader_at_least": 1.5,
                      "met": all(r["ray_vs_dataloader"] >= 1.5 for r in result["ratios"].values())}
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return _save(result, out)


def _bench_memory(spec, manifest, viewset, cpus, batch, scale, log, warm: bool = True) -> dict:
    """Stream one shard file, then the same file listed `scale` times (symlinks: Ray Data drops repeated paths).
    An unmeasured pass first (`warm`) starts Ray's worker processes, so both measured passes find the same pool."""
    first: ShardFile = manifest.splits["train"][0]
    cfg = dataclasses.replace(spec.data, cpus_per_task=_per_task(cpus))
    if warm:
        _ray_pass(cfg, _with_files(manifest, [first]), viewset, batch)
    base_rss, base_pss, procs = tree_memory()
    mem = {"cpus": cpus, "baseline_rss_mb": base_rss >> 20, "baseline_pss_mb": base_pss >> 20,
           "baseline_processes": procs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for i in range(scale):
            link = os.path.join(tmp, f"copy{i:03d}-{os.path.basename(first.path)}")
            os.symlink(first.path, link)
            copies.append(dataclasses.replace(first, path=link))
        for k, files in ((1, [first]), (scale, copies)):
            with PeakMemory() as peak:
                run = _ray_pass(cfg, _with_files(manifest, files), viewset, batch)
            mem["runs"].append({"scale": k, "images": run["images"], "images_per_s": run["images_per_s"],
                                "peak_rss_mb": peak.peak_rss >> 20, "peak_pss_mb": peak.peak_pss >> 20,
                                "processes_at_peak": peak.procs})
            log(f"[sslab] memory, dataset x{k} ({run['images']} images): peak PSS {peak.peak_pss >> 20} MiB, "
                f"peak RSS {peak.peak_rss >> 20} MiB, {peak.procs} processes (Ray idle after a warm-up pass: "
                f"PSS {base_pss >> 20} MiB, {procs} processes)")
    one, many = mem["runs"]
    mem["peak_pss_growth"] = _sig(many["peak_pss_mb"] / max(1, one["peak_pss_mb"]))
    mem["peak_pss_growth_above_idle"] = _sig((many["peak_pss_mb"] - mem["baseline_pss_mb"]) /
                                             max(1, one["peak_pss_mb"] - mem["baseline_pss_mb"]))
    return mem


# ---- train -------------------------------------------------------------------------------------------

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


def bare_loop(spec, steps: int, warmup: int, threads: int, rank: int = 0, world: int = 1) -> float:
    """steps/s of recipe forward + backward + optimizer step (+ the recipe's hooks) on views made beforehand."""
    from ..recipes import registry
    from .spec import build_recipe
    from .optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(spec.engine.seed)
    eng, manifest = spec.engine, read_manifest(spec.data.path)
    size = spec.data.crop_size or manifest.image_size[0]
    local = eng.batch_size // world
    viewset = registry.get(spec.recipe_name).views(spec.recipe, spec.data, size)
    images, labels, index = load_split(spec.data.path, "train", 4 * local)
    pre = {k: torch.from_numpy(v) for k, v in make_views(images, viewset, rank).items()}  # preloaded uint8 views
    meta_all = {"index": torch.from_numpy(index), "label": torch.from_numpy(labels)}
    recipe = build_recipe(spec, manifest, size)
    model = recipe
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(recipe, broadcast_buffers=False)
    opt = build_optimizer(eng.optimizer, recipe, eng.base_lr * eng.batch_size / 256, eng.momentum, eng.weight_decay)
    groups = len(images) // local
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        rows = slice((i % groups) * local, (i % groups + 1) * local)
        views = [normalize(pre[c][rows], manifest.mean, manifest.std) for c in viewset.columns]
        out = model(views, {k: v[rows] for k, v in meta_all.items()}, i / (warmup + steps))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if hasattr(recipe, "before_optimizer_step"):
            recipe.before_optimizer_step(i / (warmup + steps))
        opt.step()
        if hasattr(recipe, "after_step"):
            recipe.after_step(i / (warmup + steps))
    return steps / (time.perf_counter() - t0)


def _bare_rank(rank, world, port, spec_dict, steps, warmup, threads, queue):
    import torch.distributed as tdist

    from .spec import RunSpec

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        queue.put((rank, bare_loop(RunSpec.from_dict(spec_dict), steps, warmup, threads, rank, world)))
    finally:
        tdist.destroy_process_group()


def _bare_processes(spec, steps, warmup, threads, world) -> float:
    """The bare loop in `world` spawned processes joined by gloo; rank 0's steps/s."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bare_rank, args=(r, world, port, spec.to_dict(), steps, warmup, threads, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rates = dict(queue.get(timeout=1800) for _ in range(world))
    for p in procs:
        p.join()
    return rates[0]


def bench_train(data_dir: str, *, recipe: str = "simclr", overrides: dict | None = None, batch: int = 256,
                workers: int = 1, cpus_per_worker: float = 1.0, epochs: int = 2, steps: int = 30,
                warmup: int = 3, smoke: bool = False, out: str | None = None, log=print) -> dict:
    """See the module docstring."""
    import ray

    from .launch import train
    from .spec import make_spec

    flat = {"data.path": data_dir, "engine.batch_size": batch, "engine.workers": workers,
            "engine.cpus_per_worker": cpus_per_worker, "engine.epochs": epochs, "engine.steps_per_epoch": steps,
            "engine.knn_every": 0, "engine.collapse_threshold": 0.0, "engine.log_every": max(1, steps // 3),
            "data.limit": steps * batch} | (overrides or {})
    spec = make_spec(recipe, flat)
    threads = max(1, math.floor(cpus_per_worker))   # what Ray gives a Train worker: OMP_NUM_THREADS=floor(CPUs)
    result = {"benchmark": "train", "smoke": smoke, "machine": machine(), "data": spec.data.path, "recipe": recipe,
              "model": spec.model.name, "batch": batch, "workers": workers, "threads_per_worker": threads,
              "epochs": epochs, "steps_per_epoch": steps, "bare_steps": steps, "warmup_steps": warmup,
              "overrides": {k: v for k, v in flat.items() if k != "data.path"}}

    def time_bare(n: int) -> float:                       # seconds for n timed steps, after `warmup` untimed ones
        if workers > 1:
            return n / _bare_processes(spec, n, warmup, threads, workers)
        saved = torch.get_num_threads()
        try:
            return n / bare_loop(spec, n, warmup, threads)
        finally:
            torch.set_num_threads(saved)

    # half the bare loop's timed steps run before the engine and half after: drift in outside load hits both
    bare_steps = (steps // 2, steps - steps // 2)
    bare_s = [time_bare(bare_steps[0])]
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
    bare_s.append(time_bare(bare_steps[1]))
    bare = steps / sum(bare_s)
    result.update({
        "engine_steps_per_s": _sig(engine), "engine_measure": "epochs 2+, after each epoch's first step",
        "engine_in_epoch_steps_per_s": _sig(in_epoch), "engine_with_reports_steps_per_s": _sig(whole),
        "engine_wall_s": _sig(wall),
        "engine_data_wait_frac": _sig(sum(r["data_wait_frac"] for r in reports[1:]) / (len(reports) - 1)),
        "bare_steps_per_s": _sig(bare),
        "bare_before_after_steps_per_s": [_sig(n / t) for n, t in zip(bare_steps, bare_s)],
        "ratio": _sig(engine / bare),
        "ratio_in_epoch": _sig(in_epoch / bare), "ratio_with_reports": _sig(whole / bare), "reports": reports,
        "goal": {"engine_vs_bare_at_least": 0.9, "met": engine / bare >= 0.9}})
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    log(f"[sslab] steps/s: engine {engine:.3f} after the first step of each epoch ({in_epoch:.3f} whole epochs, "
        f"{whole:.3f} with reports and checkpoints); bare loop {bare:.3f}; ratio {engine / bare:.3f}")
    return _save(result, out)
