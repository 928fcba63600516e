"""`sslab eval`: kNN, linear probe, fine-tuning (the registered protocols), export, embedding projector, results
table."""
from __future__ import annotations

import json

from ..config import ConfigError
from ..datasets.cache import DATA_HELP, add_data_arguments, resolve_data_argument


def add_commands(sub) -> None:
    from ..evaluation.protocols import PROTOCOLS

    s = sub.add_parser("eval", help="evaluate a checkpoint: kNN, linear probe, fine-tuning; export; projector")
    s.add_argument("checkpoint", nargs="?", help="a checkpoint directory (holds state.pt) or a run directory "
                   "(its latest checkpoint_*)")
    add_data_arguments(s, "evaluation data: " + DATA_HELP + " (default: the run's own)")
    s.add_argument("--protocol", nargs="+", choices=PROTOCOLS.names(),
                   help="what to run (default knn and diagnostics, unless only --export/--projector is asked for): " +
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
    s.add_argument("--table", metavar="RUNS_DIR", help="evaluate every run under RUNS_DIR (every "
                   "protocol: kNN, linear, fine-tune --labels, diagnostics) and write a Markdown table")
    s.add_argument("--out", help="write the results as JSON here (with --table: the Markdown file)")
    s.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluate_runs import evaluate_checkpoint, results_table
    from .export import export

    resolve_data_argument(args)
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
    protocols = args.protocol or ([] if args.export or args.projector else ["knn", "diagnostics"])
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

