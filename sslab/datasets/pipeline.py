"""The Ray Data pipeline: Parquet shards -> decode (-> augmented uint8 views) -> Train workers.

Two places to make the views (`data.augment`): `pipeline` makes every view in the Ray Data tasks and ships them
(one column per view); `worker` ships each decoded image once (one fixed-shape uint8 column, "image") and the
training worker makes the views on its own device (`sslab.platform.loop`), so multi-crop's 8 views cost the
object store one image's bytes and a GPU draws its own random numbers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..config import knob


@dataclass(frozen=True)
class DataConfig:
    path: str = knob("", "directory written by `sslab data prepare` (holds manifest.json)")
    strength: float = knob(1.0, "colour-distortion strength s: scales jitter magnitudes (SimCLR)", min=0.0, max=4.0)
    min_scale: float = knob(0.2, "smallest random-resized-crop area fraction of global views", min=0.01, max=1.0)
    blur_p: float = knob(-1.0, "gaussian-blur probability; -1 = the recipe's own choice", min=-1.0, max=1.0)
    crop_size: int = knob(0, "side of global views in pixels; 0 = the stored image size", min=0)
    batch_rows: int = knob(1024, "rows decoded (and augmented) per call of the map function; a task maps its "
                                 "block (a shard file, or a share of one when task slots outnumber files) in calls "
                                 "of this many rows", min=1)
    cpus_per_task: float = knob(0.5, "logical CPUs each decode/augment task reserves", min=0.0, min_exclusive=True)
    # worker is the default on CPU as on GPU: `make demo` (SimCLR, 2 cores) took 157-162 s with it against 176-193 s
    # with pipeline, whose tasks took more of the cores from training than making the views there costs it
    augment: str = knob("worker", "where views are made: worker (the training worker, on its device, from one "
                                  "decoded image per row) or pipeline (Ray Data tasks, shipped one column per "
                                  "view)", choices=("worker", "pipeline"))
    shuffle_rows: int = knob(2048, "rows each training worker keeps back to mix with the next block it receives "
                                   "(its batches are drawn at random from both), so batches are made up anew "
                                   "every epoch; 0 = stream order", min=0)
    limit: int = knob(0, "use only the first N training images (0 = all); for smoke runs", min=0)
    max_bad_fraction: float = knob(0.01, "stop training when more than this share of the training rows failed to "
                                         "decode (each such row is skipped, counted and named at the end)",
                                   min=0.0, max=1.0)
    verify: bool = knob(True, "before training, check every shard against the manifest (schema, rows, sha256) and "
                              "a few images per shard against the declared size and channels; false for huge "
                              "remote data")

    def check(self):
        if not self.path:
            raise ValueError("path is required: pass --data DIR (a directory made by `sslab data prepare`)")


class DecodeImages:
    """Ray Data batch function: PNG bytes -> one fixed-shape uint8 image per row.

    In: {"image": [n] bytes, "index": [n], "label": [n]}. Out: {"image": uint8 [k, C, H, W], "index": int64 [k],
    "label": int64 [k] with -1 for unknown}, k <= n: a row whose image does not decode to `size` is left out and
    reported to the run's `BadRows` actor named `bad_rows` (without one, it is an error)."""

    def __init__(self, channels: int, size: tuple[int, int], bad_rows: str = "", encoding: str = "png"):
        self.channels, self.size, self.bad_rows, self.encoding = channels, tuple(size), bad_rows, encoding

    def __call__(self, batch: dict) -> dict:
        from .shards import decode_readable

        images, keep, bad = decode_readable(list(batch["image"]), self.channels, self.size, self.encoding)
        index = np.asarray(batch["index"], dtype=np.int64)
        if bad:
            rows = [(int(index[i]), why) for i, why in bad]
            if not self.bad_rows:
                raise ValueError(f"training row with index {rows[0][0]}: {rows[0][1]}")
            import ray

            ray.get_actor(self.bad_rows).add.remote(rows)
        labels = [batch["label"][i] for i in keep]
        labels = [-1 if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in labels]
        return {"image": images, "index": index[keep], "label": np.asarray(labels, dtype=np.int64)}


class MakeViews(DecodeImages):
    """Ray Data batch function: PNG bytes -> uint8 views, one fixed-shape column per view (`data.augment=pipeline`).

    Out: {column: uint8 [k, C, s, s] for every view, "index", "label"} for the rows `DecodeImages` keeps. Each
    batch draws a fresh key (a task cannot know its epoch); `key` fixes it, for tests and benchmarks."""

    def __init__(self, viewset, channels: int, size: tuple[int, int], bad_rows: str = "", encoding: str = "png",
                 key: int | None = None):
        super().__init__(channels, size, bad_rows, encoding)
        self.viewset, self.key = viewset, key

    def __call__(self, batch: dict) -> dict:
        from .views import make_views

        out = super().__call__(batch)
        key = self.key if self.key is not None else int.from_bytes(os.urandom(4), "little")
        views = make_views(out.pop("image"), self.viewset, key, out["index"])
        return {c: v.numpy() for c, v in views.items()} | out


class BadRows:
    """The training rows that failed to decode, as the map tasks report them (a Ray actor, one per run):
    index -> reason, each row once however many epochs meet it."""

    def __init__(self):
        self.rows: dict[int, str] = {}

    def add(self, rows: list[tuple[int, str]]) -> None:
        for index, why in rows:
            self.rows.setdefault(index, why)

    def count(self) -> int:
        return len(self.rows)

    def first(self, n: int = 5) -> list[tuple[int, str]]:
        return sorted(self.rows.items())[:n]


def start_run_actor(name: str, cls: type = BadRows):
    """The run's `BadRows` actor (or a subclass of it doing more for the run) under `name`, with no CPU reserved (it
    only counts), on the head node: the one node a run cannot lose (the driver's own node where no head is known)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    node = heads[0] if heads else ray.get_runtime_context().get_node_id()
    where = NodeAffinitySchedulingStrategy(node, soft=False)   # it asks for nothing: it fits there, even busy
    return ray.remote(num_cpus=0)(cls).options(name=name, scheduling_strategy=where).remote()


def train_dataset(cfg: DataConfig, manifest, viewset, bad_rows: str = ""):
    """The training stream: shards read in a new file order each pass, decoded by tasks and, unless `viewset` is None
    (views made by the training worker), augmented there too; unreadable rows go to the `BadRows` actor named
    `bad_rows`. Each worker mixes the rows it receives (`training_batches`)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False      # workers print their own progress lines; bars interleave badly in logs
    ctx.print_on_execution_start = False
    # Ray's V1 Parquet reader: it splits each file into several blocks at once, so augmentation runs as many small
    # tasks and the first batch arrives ~1 s into a pass. The V2 reader (the default from Ray 2.5x) lists files in
    # a separate step that held every pass 4-9 s (at 0.09 s of CPU) and made one block, hence one task and one
    # output at its end, per shard file: measured on 2 and 16 CPUs, the first batch came 9-22 s into a 10-22 s pass.
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    # Ray Data's per-operator resource reservations off: with them the read and the decode each keep a share of the
    # CPUs, and one decode task ran alone for the first 1.5-2 s of every pass though two slots were free (2 CPUs,
    # the CPUs ~70% busy). Without them, and with the worker's batching (`training_batches`), the stream went from
    # 14.1-16.1k to 21.9-22.3k img/s with two views, 20.3-21.9k to 32.9-33.3k decode only
    # (`sslab bench data --cpus 2`).
    ctx.op_resource_reservation_enabled = False
    # One read block per shard file, or one per task slot if that is more: each task then reads and maps thousands
    # of rows. Ray Data's scheduling loop waits (up to 100 ms) for every running task to have output before it
    # starts the next one, so with its default of many small blocks a slot idled through much of each short task:
    # on 2 CPUs (60k Fashion-MNIST images, two views) 12k img/s with the default blocks and 256 rows per batch, 21k
    # with a block per file, 23.5k with 1,024 rows (the CPUs ~70% busy instead of ~60%, and less CPU per image).
    # A task's output leaves as one block when the task ends (Ray fills blocks up to 128 MiB), hence ~0.7 s to the
    # first batch of a pass; blocks capped at 1-2 MiB bring that to 0.14-0.19 s but cost 20-30% of the pass's
    # throughput (decode only, 2 CPUs), and training starts each pass during the previous epoch's end anyway.
    # No randomize_block_order: it is an all-to-all step, so every block of the pass would be read (into the object
    # store) before the first is decoded; the reader already shuffles the files every pass.
    files = manifest.files("train")
    slots = int(ray.cluster_resources().get("CPU", 1) / cfg.cpus_per_task) if ray.is_initialized() else 1
    ds = ray.data.read_parquet(files, shuffle="files", override_num_blocks=max(len(files), slots))
    ds = ds.select_columns(["image", "index", "label"])
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    if viewset is None:                                                 # data.augment=worker
        fn = DecodeImages(manifest.channels, manifest.image_size, bad_rows, manifest.encoding)
    else:
        fn = MakeViews(viewset, manifest.channels, manifest.image_size, bad_rows, manifest.encoding)
    return ds.map_batches(fn, batch_size=cfg.batch_rows, batch_format="numpy", num_cpus=cfg.cpus_per_task)


def training_batches(stream, size: int, shuffle_rows: int, pin_memory: bool = False, seed=None):
    """One pass of a training stream (a Dataset or a worker's shard of one) as torch batches of `size`, whole
    batches only, each drawn at random from the rows at hand: every block as it arrives joins the rows kept back,
    and batches are drawn until `shuffle_rows` are left for the next block to mix with (0: stream order). Shards
    keep their row order and a block its rows, so without it every epoch would group the same images into a batch
    (the same negatives for the contrastive recipes). `pin_memory`: batches in page-locked memory, for a GPU."""
    import torch

    rng = np.random.default_rng(seed)
    pool: dict | None = None

    def draw(pool: dict, keep: int):
        n = len(pool["index"])
        take = max(0, n - keep) // size * size
        if not take:
            return pool
        order = rng.permutation(n) if shuffle_rows else np.arange(n)
        for b in range(0, take, size):
            batch = {k: torch.from_numpy(np.take(v, order[b:b + size], axis=0)) for k, v in pool.items()}
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
        return {k: v[order[take:]] for k, v in pool.items()}

    for block in stream.iter_batches(batch_size=None, batch_format="numpy"):
        pool = block if pool is None else {k: np.concatenate([pool[k], v]) for k, v in block.items()}
        pool = yield from draw(pool, shuffle_rows)
    if pool is not None:
        yield from draw(pool, 0)


def local_batches(cfg: DataConfig, manifest, viewset, seed: int = 0):
    """The training stream without Ray, for in-process runs (tests, notebooks): the split decoded once and held in
    memory, each pass in a new seeded order. Returns `batches(size)`, one pass per call: this rank's rows
    (rank::world of the pass's order) in batches of `size`, as dicts of tensors shaped like Ray's: the pipeline's
    views (made by its own `make_views`, keyed by (seed, pass)) or, with `viewset` None, the decoded images."""
    import torch

    from .. import dist
    from .shards import load_split
    from .views import make_views, view_key

    images, labels, index = load_split(cfg.path, "train", cfg.limit or None)
    passes = [0]

    def batches(size: int):
        rng = np.random.default_rng([seed, passes[0]])
        key = view_key(seed, passes[0])
        passes[0] += 1
        mine = rng.permutation(len(images))[dist.rank()::dist.world_size()]
        for b in range(len(mine) // size):
            rows = mine[b * size:(b + 1) * size]
            out = {"index": torch.from_numpy(index[rows]), "label": torch.from_numpy(labels[rows])}
            if viewset is None:
                yield {"image": torch.from_numpy(images[rows])} | out
            else:
                yield make_views(images[rows], viewset, key, out["index"]) | out
    return batches
