"""`sslab bench data`: the Ray Data pipeline against a torch DataLoader, side by side in one run.

Images/s of the Ray Data training stream (`datasets.pipeline.train_dataset`, unchanged) in its two forms against
`torch.utils.data.DataLoader`s over the same shard files with the same number of CPU workers:
  ray_data              the stream with views made in the pipeline (`data.augment=pipeline`)
  ray_data_decode       the stream of decoded images (`data.augment=worker`: the training worker makes the views)
  dataloader_batched    the same work as ray_data in a DataLoader (the pipeline's own map function per batch)
  dataloader_decode     the same work as ray_data_decode in a DataLoader
  dataloader_per_image  what a user would write: PIL decode + torchvision.transforms.v2 image by image (the
                        ViewSpec's crop, flip, jitter, grayscale, blur, solarize)
Each row also gives the bytes per image its batches carry (what crosses Ray's object store for the Ray rows).
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

import numpy as np
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

    def __init__(self, pngs, labels, channels, viewset, size=None, encoding="png"):
        self.pngs, self.labels, self.mode = pngs, labels, {1: "L", 3: "RGB"}[channels]
        self.columns, self.tfs = viewset.columns, torchvision_views(viewset, channels)
        self.shape, self.encoding = (channels, *(size or (0, 0))), encoding

    def __len__(self):
        return len(self.pngs)

    def __getitem__(self, i):
        from PIL import Image

        if self.encoding == "raw":
            a = np.frombuffer(self.pngs[i], np.uint8).reshape(self.shape)
            im = Image.fromarray(a[0] if self.shape[0] == 1 else a.transpose(1, 2, 0))
        else:
            with Image.open(io.BytesIO(self.pngs[i])) as im:
                im = im.convert(self.mode)
        out = {c: tf(im) for c, tf in zip(self.columns, self.tfs)}
        return out | {"index": i, "label": self.labels[i]}


class Batched(torch.utils.data.Dataset):
    """The Ray pipeline's own map function (`fn`: `MakeViews`, batch decode + batched tensor augmentation, or
    `DecodeImages`), one batch per item, inside a DataLoader."""

    def __init__(self, pngs, labels, fn, batch):
        self.pngs, self.labels, self.batch, self.fn = pngs, labels, batch, fn

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
    from ..datasets.pipeline import train_dataset, training_batches

    return time_pass(training_batches(train_dataset(cfg, manifest, viewset), batch, cfg.shuffle_rows))


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


def bench_data(data_dir: str, *, recipe: str = "simclr", images: int = 60000, cpus=(1, 2), batch: int = 256,
               repeats: int = 2, rss_scale: int = 10, rows_per_task: int = 0, smoke: bool = False,
               out: str | None = None, log=print) -> dict:
    """See the module docstring. `images`: rows used (whole shard files, at least this many). Each loader makes a
    warm-up pass (reported apart: "first_pass"; Ray's starts its worker processes, the DataLoaders' start their
    persistent workers), then `repeats` passes interleaved with the others'; its best is reported (all passes are
    in the JSON). `rows_per_task`: the pipeline's `data.batch_rows` (0: its default)."""
    import ray

    from ..recipes import registry
    from ..platform.spec import make_spec

    spec = make_spec(recipe, {"data.path": data_dir} | ({"data.batch_rows": rows_per_task} if rows_per_task else {}))
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
              "rows_per_task": spec.data.batch_rows, "encoding": manifest.encoding,
              "views": [f"{c}: {s.size}px" for c, s in viewset.views], "batch": batch, "images": n, "repeats": repeats,
              "shard_files": len(files), "rows": [], "ratios": {}}
    from ..datasets.pipeline import DecodeImages, MakeViews

    shape = (manifest.channels, manifest.image_size, "", manifest.encoding)
    per_image = PerImageViews(pngs, labels, manifest.channels, viewset, manifest.image_size, manifest.encoding)
    batched = Batched(pngs, labels, MakeViews(viewset, *shape), batch)
    decoded = Batched(pngs, labels, DecodeImages(*shape), batch)
    started = _start_ray(max(cpus))                     # one Ray for all: starting one is slow on a busy box
    for c in cpus:
        cfg = dataclasses.replace(spec.data, cpus_per_task=_per_task(c))
        # DataLoader workers start from a fork server, not by forking this process: a fork of a process connected
        # to Ray (gRPC threads) left Ray's next task unanswered in 3 of 4 runs of the smoke test; 0 of 4 this way.
        # They persist across passes, as in a training run (started once, in the warm-up pass).
        loader = lambda ds, **kw: torch.utils.data.DataLoader(
            ds, shuffle=True, num_workers=c, multiprocessing_context="forkserver", persistent_workers=True, **kw)
        made = {"dataloader_batched": loader(batched, batch_size=None),
                "dataloader_decode": loader(decoded, batch_size=None),
                "dataloader_per_image": loader(per_image, batch_size=batch)}
        loaders = {"ray_data": lambda: _ray_pass(cfg, sub, viewset, batch),
                   "ray_data_decode": lambda: _ray_pass(cfg, sub, None, batch)}
        loaders |= {k: (lambda dl=dl: time_pass(dl)) for k, dl in made.items()}
        first = {k: run() for k, run in loaders.items()}
        passes: dict[str, list] = {k: [] for k in loaders}
        for _ in range(repeats):                       # interleaved: a burst of outside load hits every loader
            for k, run in loaders.items():
                passes[k].append(run())
        del made                                       # their workers exit
        rows = {k: {"loader": k, "cpus": c, "passes": [p["images_per_s"] for p in ps], "first_pass": first[k]} |
                max(ps, key=lambda p: p["images_per_s"]) for k, ps in passes.items()}
        for r in rows.values():
            log(f"[sslab] {r['loader']:22s} {c} CPU: {r['images_per_s']:>9,.0f} img/s "
                f"(steady {r['steady_images_per_s']:,.0f}, first batch {r['first_batch_s']:.2f} s, "
                f"{r['bytes_per_image']:,} B/image; passes {', '.join(f'{x:,.0f}' for x in r['passes'])}; "
                f"warm-up pass {r['first_pass']['images_per_s']:,.0f})")
        result["rows"] += list(rows.values())
        rate = {k: r["images_per_s"] for k, r in rows.items()}
        result["ratios"][str(c)] = {
            "ray_vs_same_work_dataloader": sig(rate["ray_data"] / rate["dataloader_batched"]),
            "ray_decode_vs_same_work_dataloader": sig(rate["ray_data_decode"] / rate["dataloader_decode"]),
            "ray_vs_per_image_dataloader": sig(rate["ray_data"] / rate["dataloader_per_image"]),
            "ray_first_pass_vs_same_work_dataloader": sig(first["ray_data"]["images_per_s"] /
                                                          first["dataloader_batched"]["images_per_s"]),
            "batched_vs_per_image_dataloader": sig(rate["dataloader_batched"] / rate["dataloader_per_image"]),
            "view_bytes_vs_image_bytes": sig(rows["ray_data"]["bytes_per_image"] /
                                             rows["ray_data_decode"]["bytes_per_image"])}
    result["memory"] = _bench_memory(spec, manifest, viewset, max(cpus), batch, rss_scale, log, warm=not smoke)
    if started:
        ray.shutdown()
    result["goal"] = {"ray_vs_same_work_dataloader_at_least": 1.0, "ray_vs_per_image_dataloader_at_least": 1.5,
                      "met": all(r["ray_vs_same_work_dataloader"] >= 1.0 and r["ray_vs_per_image_dataloader"] >= 1.5
                                 for r in result["ratios"].values())}
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
