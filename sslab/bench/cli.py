"""`sslab bench data|train`: throughput measured side by side in one run, printed as a table and written as JSON."""
from __future__ import annotations

import os

from ..config import parse_overrides


def add_commands(sub) -> None:
    b = sub.add_parser("bench", help="throughput benchmarks, measured side by side").add_subparsers(
        dest="bench_cmd", required=True)
    s = b.add_parser("data", help="Ray Data pipeline vs a torch DataLoader (images/s, 1 and 2 CPUs; peak memory)")
    s.add_argument("--data", default="data/fashion-mnist", help="prepared dataset")
    s.add_argument("--recipe", default="simclr", help="whose views to make")
    s.add_argument("--images", type=int, default=60000, help="training images per pass (whole shard files)")
    s.add_argument("--rows-per-task", type=int, default=0, help="the pipeline's data.batch_rows (0: its default)")
    s.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="CPU counts to compare at")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--repeats", type=int, default=2, help="passes per loader (interleaved); the best is reported")
    s.add_argument("--rss-scale", type=int, default=10, help="memory: the dataset grown this many times")
    s.add_argument("--out", default="bench/data.json", help="JSON results")
    s.add_argument("--smoke", action="store_true", help="tiny sizes, to check the command works")
    s.set_defaults(fn=cmd_bench_data)

    s = b.add_parser("train", help="the engine (Ray Train, stream, callbacks) vs the bare loop: its own train_step "
                     "alone (steps/s)")
    s.add_argument("--data", default="data/fashion-mnist", help="prepared dataset")
    s.add_argument("--recipe", default="simclr")
    s.add_argument("--batch-size", type=int, default=256, help="global batch")
    s.add_argument("--workers", type=int, default=1, help="processes, for both")
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="engine.cpus_per_worker; the bare loop "
                   "gets the same torch thread count (floor)")
    s.add_argument("--epochs", type=int, default=2, help="engine epochs (steady state from the 2nd on)")
    s.add_argument("--steps", type=int, default=30, help="steps per epoch, and timed steps of the bare loop")
    s.add_argument("--warmup", type=int, default=3, help="untimed first steps of the bare loop")
    s.add_argument("--out", default="bench/train.json", help="JSON results")
    s.add_argument("--gpu", action="store_true", help="one GPU for both: bf16, channels-last, views made on the GPU")
    s.add_argument("--smoke", action="store_true", help="tiny sizes, to check the command works")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides, e.g. model.name=resnet18")
    s.set_defaults(fn=cmd_bench_train)


def _smoke_data() -> str:
    """A tiny generated dataset for --smoke runs (2 classes of 16x16 grey images), in a temp folder."""
    import tempfile

    import numpy as np

    from ..datasets import shards

    out = os.path.join(tempfile.mkdtemp(prefix="sslab-smoke-"), "shards")
    rng = np.random.default_rng(0)

    def records():
        for i in range(120):
            img = rng.integers(0, 60, (16, 16, 1), dtype=np.uint8)
            img[(i % 2) * 8:(i % 2) * 8 + 8] += 150
            yield ("train" if i < 96 else "test"), img, i % 2, f"gen{i}"
    shards.prepare(records(), out, name="smoke", classes=["a", "b"], shard_rows=32, progress=None)
    return out


def cmd_bench_data(args) -> int:
    from .data import bench_data

    if args.smoke:
        r = bench_data(_smoke_data(), recipe=args.recipe, images=64, cpus=(1, 2), batch=16, repeats=1, rss_scale=3,
                       rows_per_task=16,
                       smoke=True, out=args.out)
    else:
        r = bench_data(args.data, recipe=args.recipe, images=args.images, cpus=tuple(args.cpus), batch=args.batch,
                       repeats=args.repeats, rss_scale=args.rss_scale, rows_per_task=args.rows_per_task, out=args.out)
    names = ("ray_data", "dataloader_batched", "dataloader_per_image", "ray_data_decode", "dataloader_decode")
    print(f"\nimages/s, best of {r['repeats']} passes (bytes per image in the batches)")
    print(f"{'CPUs':>4} | " + " | ".join(f"{n:>22}" for n in names) + " | Ray / same work | Ray / per-image")
    for c, ratio in r["ratios"].items():
        rows = {x["loader"]: x for x in r["rows"] if str(x["cpus"]) == c}
        cells = " | ".join(f"{rows[n]['images_per_s']:>11,.0f} ({rows[n]['bytes_per_image']:>5} B)" for n in names)
        print(f"{c:>4} | {cells} | {ratio['ray_vs_same_work_dataloader']:>14.2f}x | "
              f"{ratio['ray_vs_per_image_dataloader']:>14.2f}x")
    mem = r["memory"]
    print(f"peak PSS of the process tree: {mem['runs'][0]['peak_pss_mb']} MiB (x1) -> {mem['runs'][1]['peak_pss_mb']} "
          f"MiB (x{args.rss_scale if not args.smoke else 3}); Ray idle {mem['baseline_pss_mb']} MiB")
    print(f"results: {args.out}")
    return 0


def cmd_bench_train(args) -> int:
    from .train import bench_train

    overrides = parse_overrides(args.overrides)
    if args.smoke:
        small = {"recipe.hidden": 16, "recipe.dim": 8} if args.recipe == "simclr" else {}
        overrides = {"model.width": 4, "data.batch_rows": 16} | small | overrides
        r = bench_train(_smoke_data(), recipe=args.recipe, overrides=overrides, batch=16, workers=args.workers,
                        cpus_per_worker=0.5, epochs=2, steps=4, warmup=1, smoke=True, out=args.out)
    else:
        r = bench_train(args.data, recipe=args.recipe, overrides=overrides, batch=args.batch_size,
                        workers=args.workers, cpus_per_worker=args.cpus_per_worker, epochs=args.epochs,
                        steps=args.steps, warmup=args.warmup, gpu=args.gpu, out=args.out)
    print(f"\n{'':44s} steps/s\n{'engine, after the first steps of each epoch':44s} {r['engine_steps_per_s']:.3f}\n"
          f"{'engine, whole epochs (stream restart incl.)':44s} {r['engine_in_epoch_steps_per_s']:.3f}\n"
          f"{'engine, with reports and checkpoints':44s} {r['engine_with_reports_steps_per_s']:.3f}\n"
          f"{'bare loop (the same train_step, no Ray)':44s} {r['bare_steps_per_s']:.3f}\n"
          f"{'engine: share of steady time waiting on data':44s} {r['engine_data_wait_frac']:.3f}\n"
          f"{'ratio engine / bare (goal >= 0.9)':44s} {r['ratio']:.3f}\n"
          f"{'engine images/s, whole epochs':44s} {r['engine_in_epoch_images_per_s']:,.0f}\n"
          f"{'views made on the ' + r['device'] + ', ms per local batch':44s} {r['views_on_device_ms_per_batch']:.2f}")
    print(f"results: {args.out}")
    return 0
