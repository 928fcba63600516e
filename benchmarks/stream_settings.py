"""Ray Data settings of the training stream, side by side: read blocks (Ray's default vs one per shard file) x rows
per map call, then Ray Data's per-operator resource reservations turned off, on a local Ray with --cpus CPUs and one
task per CPU. Each setting streams the whole training split --passes times (interleaved with the others'); prints
the median images/s, the first batch's wait, how busy the machine's CPUs were and the driver's own CPU share.

    .venv/bin/python benchmarks/stream_settings.py --data data/fashion-mnist            # ~2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time


def cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--decode-only", action="store_true", help="the data.augment=worker stream")
    args = ap.parse_args()

    import ray
    import ray.data

    from sslab.datasets.pipeline import DecodeImages, MakeViews
    from sslab.datasets.shards import read_manifest
    from sslab.datasets.views import two_views

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.use_datasource_v2 = False, False
    m = read_manifest(args.data)
    files = m.files("train")
    fn = DecodeImages(m.channels, m.image_size) if args.decode_only else MakeViews(two_views(m.image_size[0]),
                                                                                  m.channels, m.image_size)

    def stream(blocks, rows, reserve=True):
        ctx.op_resource_reservation_enabled = reserve
        ds = ray.data.read_parquet(files, shuffle="files", **({"override_num_blocks": blocks} if blocks else {}))
        ds = ds.select_columns(["image", "index", "label"])
        return ds.map_batches(fn, batch_size=rows, batch_format="numpy", num_cpus=1.0)

    settings = {"default blocks, 256 rows": (0, 256), "default blocks, 1024 rows": (0, 1024),
                "block per file, 256 rows": (len(files), 256), "block per file, 1024 rows": (len(files), 1024),
                "same, no reservations": (len(files), 1024, False), "default blocks, no reservations": (0, 1024, False)}
    stream(len(files), 1024).materialize()                       # starts Ray's worker processes
    got = {k: [] for k in settings}
    for _ in range(args.passes):
        for name, setting in settings.items():
            idle0, all0 = cpu_times()
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            n, first = 0, None
            for b in stream(*setting).iter_torch_batches(batch_size=256):
                n, first = n + len(b["index"]), first or time.perf_counter() - t0
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            idle1, all1 = cpu_times()
            driver = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (t1 - t0)
            got[name].append((n / (t1 - t0), 1 - (idle1 - idle0) / (all1 - all0), driver, first))
    print(f"{len(files)} shard files, {m.count('train')} images, {args.cpus} CPUs, medians of {args.passes} passes")
    for name, runs in got.items():
        rate, busy, driver, first = (statistics.median(x[i] for x in runs) for i in range(4))
        print(f"{name:32s} {rate:>9,.0f} img/s   first batch {first:4.2f} s   CPUs busy {busy:4.0%}   "
              f"driver {driver:4.0%} of a core")
    ray.shutdown()


if __name__ == "__main__":
    main()
