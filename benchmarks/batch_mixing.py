"""How a training worker turns its stream into batches: sslab's `training_batches` against Ray Data's own
`iter_torch_batches(local_shuffle_buffer_size=...)`, side by side. For each: the CPU seconds the consumer spends per
pass (on a materialized copy of the stream, so only the batching is timed), and on the live stream how widely the
batches mix (shard files per batch, spread of the image indices in a batch, every image once per pass).

    .venv/bin/python benchmarks/batch_mixing.py --data data/fashion-mnist        # ~1 minute on 2 cores
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shuffle-rows", type=int, default=2048)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()

    import ray

    from sslab.datasets.pipeline import DataConfig, train_dataset, training_batches
    from sslab.datasets.shards import read_manifest

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    m = read_manifest(args.data)
    cfg = DataConfig(path=args.data)
    first_row = np.cumsum([0] + [f.rows for f in m.splits["train"]])     # shard files hold consecutive indices
    consumers = {
        "ray local shuffle": lambda ds: ds.iter_torch_batches(batch_size=args.batch, drop_last=True,
                                                              local_shuffle_buffer_size=args.shuffle_rows),
        "sslab training_batches": lambda ds: training_batches(ds, args.batch, args.shuffle_rows)}
    held = train_dataset(cfg, m, None).materialize()
    print(f"{m.count('train')} images in {len(first_row) - 1} shard files, batches of {args.batch}, "
          f"{args.shuffle_rows} shuffle rows, medians of {args.passes} passes")
    for name, batches in consumers.items():
        cpu, files, spread, seen = [], [], [], []
        for _ in range(args.passes):
            c0 = time.process_time()
            for _ in batches(held):
                pass
            cpu.append(time.process_time() - c0)
            index = [b["index"].numpy() for b in batches(train_dataset(cfg, m, None))]
            files.append(np.mean([len(np.unique(np.searchsorted(first_row, i, "right"))) for i in index]))
            spread.append(np.median([i.max() - i.min() for i in index]))
            rows = np.concatenate(index)
            seen.append(len(rows) == len(np.unique(rows)))
        print(f"{name:24s} consumer CPU {statistics.median(cpu):.2f} s per pass, {statistics.median(files):.2f} "
              f"shard files per batch, index spread {statistics.median(spread):,.0f}, each image once: {all(seen)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
