"""`sslab embed`: a trained encoder's embedding of every image of a prepared dataset, by Ray Data batch inference.

The shards stream through Ray Data: read and decoded by tasks, encoded by a pool of encoder replicas (actors: one
per GPU, or on CPUs one single-threaded replica per logical CPU but one); this process writes the replicas' output
into one Parquet file as it arrives, a few batches in flight at a time, so memory does not grow with the data.
Columns: `id` (the row's index in its split: the shards' stable `index`), `label` (-1 when unknown), `split`,
`embedding` (fixed_size_list<float32>[d]). Rows come in no particular order: (split, id) names one image.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError
from ..datasets.cache import DATA_HELP, add_data_arguments, resolve_data_argument


def decode(batch: pa.Table, split: str, channels: int, size: tuple[int, int], encoding: str = "png") -> dict:
    """Ray Data batch function: shard rows -> {"image": uint8 [n, C, H, W], "id", "label" (-1 when unknown),
    "split"}. An image that does not decode is an error naming its row."""
    from ..datasets.shards import decode_readable

    images, _, bad = decode_readable(batch.column("image").to_pylist(), channels, size, encoding)
    ids = batch.column("index").to_numpy()
    if bad:
        raise ValueError(f"{split} row with index {ids[bad[0][0]]} is not a readable {size[0]}x{size[1]} image "
                         f"({bad[0][1]})")
    out = {"image": images, "id": ids, "label": batch.column("label").fill_null(-1).to_numpy(),
           "split": np.full(len(ids), split)}
    return out


class Encode:
    """Ray Data actor, one encoder replica: decoded images -> the same rows with their `embedding`, images dropped.
    Images are normalised and resized like `sslab eval` prepares them (`evaluation.knn.make_prepare`)."""

    def __init__(self, encoder, mean, std, size: int, device: str, threads: int):
        import torch

        from ..evaluation.knn import make_prepare

        if threads:
            torch.set_num_threads(threads)
        self.encoder = encoder.to(device).eval()
        self.prepare = make_prepare(mean, std, size, device)

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        with torch.no_grad():
            feats = self.encoder(self.prepare(torch.tensor(batch["image"]))).float().flatten(1).cpu().numpy()
        columns = {"id": pa.array(batch["id"], pa.int64()), "label": pa.array(batch["label"], pa.int64()), "split": pa.array(list(batch["split"]), pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel(), pa.float32()),
                                                                   feats.shape[1])}
        return pa.table(columns)


def plan_replicas(device: str, cluster: dict, replicas: int = 0) -> tuple[str, int, dict]:
    """(device, replicas, resources of each): `device` auto is cuda when the cluster has GPUs. One replica per GPU
    (1 GPU + 1 CPU each); on CPUs one per logical CPU but one (1 CPU, one torch thread each), the CPU left over
    reading, decoding and writing. `replicas` > 0 overrides the count."""
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 1))
    device = ("cuda" if gpus else "cpu") if device == "auto" else device
    if device == "cuda":
        if not gpus:
            raise ConfigError("--device cuda: the Ray cluster has no GPUs (use --device cpu or auto)")
        return device, replicas or gpus, {"num_gpus": 1, "num_cpus": 1}
    if device != "cpu":
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    return device, replicas or max(1, cpus - 1), {"num_cpus": 1}


def check_out(out: str, force: bool) -> str:
    """`out` as an absolute path; refuses an existing one without `force`, and a directory even with it."""
    if "://" in out:
        raise ConfigError(f"--out {out}: a local file path is needed (write it there, then copy it)")
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise FileExistsError(f"{out} is a directory; sslab embed writes one Parquet file: choose a file name")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} already exists: pass --force (force=True) to replace it, or choose another "
                              f"--out")
    return out


def embed(run_or_checkpoint: str, data: str | None = None, out: str = "embeddings.parquet", *, split: str = "all",
          batch_size: int = 256, device: str = "auto", force: bool = False, replicas: int = 0,
          address: str | None = None, log=print) -> str:
    """Embed every image of `split` ("all": every split) of the prepared dataset `data` (default: the run's own) with
    the trained encoder of `run_or_checkpoint` (a run or checkpoint directory) into the Parquet file `out`, which
    only appears once complete (an existing one is replaced only with `force`). `batch_size` images go through an
    encoder at a time. Uses the running Ray, or joins `address`, or starts a local one. Returns `out`."""
    import ray
    import ray.data

    from .checkpoint import load_trained
    from .launch import init_ray

    out = check_out(out, force)
    if batch_size < 1 or replicas < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --replicas >= 0, got {batch_size} and {replicas}")
    t = load_trained(run_or_checkpoint, data)
    m = t.manifest
    files = {s: m.files(s) for s in (m.split_names if split == "all" else [split])}   # refuses a split it lacks
    counts = {s: m.count(s) for s in files}
    total = sum(counts.values())
    if not total:
        raise ConfigError(f"{m.root}: split {split!r} has no images to embed")
    init_ray(address, 0)
    device, n, resources = plan_replicas(device, ray.cluster_resources(), replicas)
    # Ray's V1 Parquet reader, as the training pipeline uses (datasets/pipeline.py): the V2 one's separate listing
    # step made a 120-image embedding 2-3x slower here. The flag is read when read_parquet is called.
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = getattr(ctx, "use_datasource_v2", False), False
    try:
        parts = [ray.data.read_parquet(f).map_batches(decode, batch_size=batch_size, batch_format="pyarrow",
                                                      fn_kwargs={"split": s, "channels": m.channels,
                                                                 "size": m.image_size, "encoding": m.encoding})
                 for s, f in files.items()]
    finally:
        ctx.use_datasource_v2 = v2
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(Encode, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n),
                        fn_constructor_kwargs={"encoder": t.encoder, "mean": t.mean, "std": t.std,
                                               "size": t.image_size, "device": device,
                                               "threads": 1 if device == "cpu" else 0}, **resources)
    log(f"[sslab] embedding {total} images ({', '.join(f'{s} {c}' for s, c in counts.items())}) of "
        f"{m.root} with {t.path} ({t.spec.model.name}, {t.image_size} px): {n} {device} replica(s), batches of "
        f"{batch_size}")
    start = time.time()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.embed-{os.getpid()}")
    writer, rows = None, 0
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):   # as the replicas return them
            writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
            if rows * 10 // total > (rows - table.num_rows) * 10 // total:              # every tenth
                log(f"[sslab] embedded {rows}/{total} images ({time.time() - start:.0f} s)")
        writer.close()
        writer = None
        if rows != total:
            raise ValueError(f"embedding gave {rows} rows, the data has {total}")
        os.replace(tmp, out)
    finally:
        if writer:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"[sslab] wrote {rows} embeddings to {out} in {time.time() - start:.1f} s")
    return out


def add_commands(sub) -> None:
    s = sub.add_parser("embed", help="write a trained encoder's embedding of every image to one Parquet file",
                       description="Batch inference with Ray Data: a pool of encoder replicas (one per GPU, or one "
                       "per CPU but one) embeds every image of a prepared dataset. OUT is one Parquet file with "
                       "columns id (the row's index in its split), label (-1 when unknown), split, embedding "
                       "(fixed-size list of float32); pandas.read_parquet(OUT) "
                       "reads it. --data may be a raw folder of images (prepared into a cache first).")
    s.add_argument("run", metavar="RUN", help="a run directory (its latest checkpoint) or a checkpoint directory")
    add_data_arguments(s, DATA_HELP + " (default: the run's own)")
    s.add_argument("--out", required=True, metavar="FILE", help="the Parquet file to write (e.g. emb.parquet)")
    s.add_argument("--split", default="all", help="train, test, or all (default)")
    s.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default 256)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): one replica per GPU when the cluster has GPUs, else CPU replicas")
    s.add_argument("--replicas", type=int, default=0, help="encoder replicas (default: one per GPU, or one per "
                   "CPU but one)")
    s.add_argument("--address", help="join a Ray cluster (auto or ray://host:10001) instead of a local instance")
    s.add_argument("--force", action="store_true", help="replace an existing OUT")
    s.add_argument("--verbose", action="store_true", help="show Ray's own output too (by default it goes to a log "
                   "file named at the start)")
    s.set_defaults(fn=cmd_embed)


def cmd_embed(args) -> int:
    import tempfile

    from .console import quiet_stderr

    resolve_data_argument(args)
    ray_log = os.path.join(tempfile.gettempdir(), f"sslab-embed-{os.getpid()}.log")
    if not args.verbose:
        print(f"[sslab] Ray's own messages: {ray_log} (--verbose shows them here)")
    with quiet_stderr(ray_log, enabled=not args.verbose):
        embed(args.run, args.data, args.out, split=args.split, batch_size=args.batch_size, device=args.device,
              force=args.force, replicas=args.replicas, address=args.address)
    return 0
