"""`sslab bench data`: the Ray Data pipeline against a torch DataLoader, side by side in one run.

Images/s of the Ray Data multi-view pipeline (`datasets.pipeline.train_dataset`, unchanged) against a
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
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile

import torch

from ..datasets.shards import ShardFile, read_manifest
from ..datasets.views import blur_kernel_size
from .measure import PeakMemory, machine, save_json, sig, time_pass, tree_memory


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

    def __init__(self, pngs, labels, channels, size, viewset, batch):
        from ..datasets.pipeline import MakeViews

        self.pngs, self.labels, self.batch = pngs, labels, batch
        self.fn = MakeViews(viewset, channels, size)

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
    from ..platform.spec import make_spec

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
    batched = BatchedViews(pngs, labels, manifest.channels, manifest.image_size, viewset, batch)
    started = _start_ray(max(cpus))                     # one Ray for all: starting one is slow on a busy box
    for c in cpus:
        cfg = dataclasses.replace(spec.data, cpus_per_task=_per_task(c))
        first = _ray_pass(cfg, sub, viewset, batch)  # (the very first pass also starts Ray's worker processes)
        # DataLoader workers start from a fork server, not by forking this process: a fork of a process connected
        # to Ray (gRPC threads) left Ray's next task unanswered in 3 of 4 runs of the smoke test; 0 of 4 this way
        loaders = {
            "ray_data": lambda: _ray_pass(cfg, sub, viewset, batch),
            "dataloader_per_image": lambda: time_pass(torch.utils.data.DataLoader(
                per_image, batch_size=batch, shuffle=True, num_workers=c, multiprocessing_context="forkserver")),
            "dataloader_batched": lambda: time_pass(torch.utils.data.DataLoader(
                batched, batch_size=None, shuffle=True, num_workers=c, multiprocessing_context="forkserver"))}
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
            "ray_vs_dataloader": sig(ray_r["images_per_s"] / pil["images_per_s"]),
            "ray_first_pass_vs_dataloader": sig(first["images_per_s"] / pil["images_per_s"]),
            "ray_vs_dataloader_steady": sig(ray_r["steady_images_per_s"] / pil["steady_images_per_s"]),
            "batched_dataloader_vs_dataloader": sig(bat["images_per_s"] / pil["images_per_s"]),
            "ray_vs_batched_dataloader": sig(ray_r["images_per_s"] / bat["images_per_s"])}
    result["memory"] = _bench_memory(spec, manifest, viewset, max(cpus), batch, rss_scale, log, warm=not smoke)
    if started:
        ray.shutdown()
    result["goal"] = {"ray_vs_dataloader_at_least": 1.5,
                      "met": all(r["ray_vs_dataloader"] >= 1.5 for r in result["ratios"].values())}
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return save_json(result, out)


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
    mem["peak_pss_growth"] = sig(many["peak_pss_mb"] / max(1, one["peak_pss_mb"]))
    mem["peak_pss_growth_above_idle"] = sig((many["peak_pss_mb"] - mem["baseline_pss_mb"]) /
                                             max(1, one["peak_pss_mb"] - mem["baseline_pss_mb"]))
    return mem
