"""`sslab eval` (kNN, linear probe, fine-tuning, export, embedding projector, results table) and `sslab bench`."""
from __future__ import annotations

import json
import os

from ..config import ConfigError, parse_overrides


def add_commands(sub) -> None:
    from ..evaluation.protocols import PROTOCOLS

    s = sub.add_parser("eval", help="evaluate a checkpoint: kNN, linear probe, fine-tuning; export; projector")
    s.add_argument("checkpoint", nargs="?", help="a checkpoint directory (holds state.pt) or a run directory "
                   "(its latest checkpoint_*)")
    s.add_argument("--data", help="evaluation data made by `sslab data prepare` (default: the run's own)")
    s.add_argument("--protocol", nargs="+", choices=PROTOCOLS.names(),
                   help="what to run (default knn, unless only --export/--projector is asked for): " +
                   "; ".join(f"{n}: {PROTOCOLS.get(n).__doc__.strip().splitlines()[0]}" for n in PROTOCOLS.names()))
    s.add_argument("--labels", default="10%", help="fine-tuning: class-balanced share of the labels, e.g. 1%%, "
                   "10%%, 100%% (fixed --seed)")
    s.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (default: 60 for 1%%, else 30)")
    s.add_argument("--train-limit", type=int, default=0, help="use the first N training images (0 = all)")
    s.add_argument("--test-limit", type=int, default=0, help="use the first N test images (0 = all)")
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    s.add_argument("--ray-tasks", type=int, default=0, help="extract features in N Ray tasks (worth it on a "
                   "cluster; 0 = in this process, which already uses every local core)")
    s.add_argument("--seed", type=int, default=0, help="label subset, held-out split and fine-tuning seed")
    s.add_argument("--export", metavar="OUT", help="write the backbone as a plain state_dict + JSON config to OUT")
    s.add_argument("--projector", type=int, default=0, metavar="N",
                   help="write N test features with labels and thumbnails for TensorBoard's projector")
    s.add_argument("--logdir", help="where the projector goes (default: the run's tensorboard directory)")
    s.add_argument("--table", metavar="RUNS_DIR", help="evaluate every run under RUNS_DIR (kNN, linear, "
                   "fine-tune --labels) and write a Markdown table")
    s.add_argument("--out", help="write the results as JSON here (with --table: the Markdown file)")
    s.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="throughput benchmarks, measured side by side").add_subparsers(
        dest="bench_cmd", required=True)
    s = b.add_parser("data", help="Ray Data pipeline vs a torch DataLoader (images/s, 1 and 2 CPUs; peak memory)")
    s.add_argument("--data", default="data/fashion-mnist", help="prepared dataset")
    s.add_argument("--recipe", default="simclr", help="whose views to make")
    s.add_argument("--images", type=int, default=20000, help="training images per pass (whole shard files)")
    s.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="CPU counts to compare at")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--repeats", type=int, default=2, help="passes per loader (interleaved); the best is reported")
    s.add_argument("--rss-scale", type=int, default=10, help="memory: the dataset grown this many times")
    s.add_argument("--out", default="bench/data.json", help="JSON results")
    s.add_argument("--smoke", action="store_true", help="tiny sizes, to check the command works")
    s.set_defaults(fn=cmd_bench_data)

    s = b.add_parser("train", help="full engine vs a bare PyTorch loop (steps/s)")
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
    s.add_argument("--smoke", action="store_true", help="tiny sizes, to check the command works")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides, e.g. model.name=resnet18")
    s.set_defaults(fn=cmd_bench_train)


def cmd_eval(args) -> int:
    from .evaluate_runs import evaluate_checkpoint, results_table
    from .export import export

    if args.table:
        print(results_table(args.table, args.data, args.labels, out=args.out, train_limit=args.train_limit,
                            test_limit=args.test_limit, finetune_epochs=args.epochs, device=args.device,
                            ray_tasks=args.ray_tasks, seed=args.seed))
        return 0
    if not args.checkpoint:
        raise ConfigError("sslab eval needs a CHECKPOINT (or --table RUNS_DIR)")
    results = {}
    if args.export:
        results["export"] = export(args.checkpoint, args.export, args.data)
        print(f"[sslab] exported {', '.join(results['export'])}")
    protocols = args.protocol or ([] if args.export or args.projector else ["knn"])
    if protocols or args.projector:
        try:
            results |= evaluate_checkpoint(args.checkpoint, args.data, protocols, args.labels,
                                           train_limit=args.train_limit, test_limit=args.test_limit,
                                           finetune_epochs=args.epochs, device=args.device, ray_tasks=args.ray_tasks,
                                           projector=args.projector, logdir=args.logdir, seed=args.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


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
    from .bench import bench_data

    if args.smoke:
        r = bench_data(_smoke_data(), recipe=args.recipe, images=64, cpus=(1, 2), batch=16, repeats=1, rss_scale=3,
                       smoke=True, out=args.out)
    else:
        r = bench_data(args.data, recipe=args.recipe, images=args.images, cpus=tuple(args.cpus), batch=args.batch,
                       repeats=args.repeats, rss_scale=args.rss_scale, out=args.out)
    print(f"\n{'CPUs':>4} | {'Ray Data img/s':>14} | {'DataLoader per-image':>20} | {'DataLoader batched':>18} | "
          f"Ray / DataLoader")
    for c, ratio in r["ratios"].items():
        rows = {x["loader"]: x for x in r["rows"] if str(x["cpus"]) == c}
        print(f"{c:>4} | {rows['ray_data']['images_per_s']:>14,.0f} | "
              f"{rows['dataloader_per_image']['images_per_s']:>20,.0f} | "
              f"{rows['dataloader_batched']['images_per_s']:>18,.0f} | {ratio['ray_vs_dataloader']:.2f}x")
    mem = r["memory"]
    print(f"peak PSS of the process tree: {mem['runs'][0]['peak_pss_mb']} MiB (x1) -> {mem['runs'][1]['peak_pss_mb']} "
          f"MiB (x{args.rss_scale if not args.smoke else 3}); Ray idle {mem['baseline_pss_mb']} MiB")
    print(f"results: {args.out}")
    return 0


def cmd_bench_train(args) -> int:
    from .bench import bench_train

    overrides = parse_overrides(args.overrides)
    if args.smoke:
        small = {"recipe.hidden": 16, "recipe.dim": 8} if args.recipe == "simclr" else {}
        overrides = {"model.width": 4, "data.batch_rows": 16} | small | overrides
        r = bench_train(_smoke_data(), recipe=args.recipe, overrides=overrides, batch=16, workers=args.workers,
                        cpus_per_worker=0.5, epochs=2, steps=4, warmup=1, smoke=True, out=args.out)
    else:
        r = bench_train(args.data, recipe=args.recipe, overrides=overrides, batch=args.batch_size,
                        workers=args.workers, cpus_per_worker=args.cpus_per_worker, epochs=args.epochs,
                        steps=args.steps, warmup=args.warmup, out=args.out)
    print(f"\n{'':44s} steps/s\n{'engine, after the first steps of each epoch':44s} {r['engine_steps_per_s']:.3f}\n"
          f"{'engine, whole epochs (stream restart incl.)':44s} {r['engine_in_epoch_steps_per_s']:.3f}\n"
          f"{'engine, with reports and checkpoints':44s} {r['engine_with_reports_steps_per_s']:.3f}\n"
          f"{'bare PyTorch loop':44s} {r['bare_steps_per_s']:.3f}\n"
          f"{'engine: share of steady time waiting on data':44s} {r['engine_data_wait_frac']:.3f}\n"
          f"{'ratio engine / bare (goal >= 0.9)':44s} {r['ratio']:.3f}")
    print(f"results: {args.out}")
    return 0
