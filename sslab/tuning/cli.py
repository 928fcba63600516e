"""`sslab tune`: a Ray Tune sweep of Ray Train runs, scored by kNN top-1, with a report at the end."""
from __future__ import annotations

import argparse
import os

from ..config import ConfigError, parse_overrides
from ..datasets.cache import DATA_HELP, add_data_arguments

EPILOG = """\
search space (--space, comma separated, may repeat; or a YAML file):
  NAME                       a named space: temperature (recipe.temperature ~ loguniform 0.05-0.5),
                             momentum (recipe.momentum = 1 - loguniform 1e-4-0.1, i.e. 0.9-0.9999),
                             queue (recipe.queue_size: 4, 16, 64 or 256 global batches),
                             strength (data.strength ~ uniform 0.25-1.5)
  KEY=uniform:LOW,HIGH       e.g. data.min_scale=uniform:0.1,0.5
  KEY=loguniform:LOW,HIGH    e.g. engine.base_lr=loguniform:0.01,1
  KEY=1-loguniform:LOW,HIGH  1 - value is log-uniform (knobs near 1), e.g. recipe.momentum=1-loguniform:1e-3,0.1
  KEY=randint:LOW,HIGH       an integer, both ends included
  KEY=choice:V1,V2,...       one value drawn per trial, e.g. recipe.dim=choice:64,128
  KEY=grid:V1,V2,...         every value tried (times --samples)
  NAME=DIST:...              a named space over another range, e.g. temperature=loguniform:0.1,1
  FILE.yaml                  keys or names mapped to the same strings, a list (a choice) or nothing
                             (a named space's own range), e.g. "recipe.temperature: loguniform:0.05,0.5"
KEYs are the dotted config keys `sslab train` overrides take (see `sslab config RECIPE`).

examples:
  sslab tune simclr --data data/fmnist --space temperature,strength --samples 8 --epochs 5
  sslab tune mocov2 --data data/fmnist --space temperature,momentum,queue --scheduler pbt --interval 2
  sslab tune simclr --data data/fmnist --space temperature,recipe.dim=choice:64,128 --search optuna
  sslab tune simclr --name tune-simclr-20250101-120000      # resume (or re-report) that sweep

Each trial is a Ray Train run (--workers-per-trial workers); ASHA stops trials whose kNN top-1 lags at an epoch
(--grace-period, --reduction-factor); PBT trains in segments of --interval epochs and clones the leaders'
checkpoints (weights, optimizer, recipe state) into the laggards with perturbed continuous knobs. The report
(table, CSV, Markdown, best preset, PNGs, TensorBoard HParams) lands in SWEEP/report.
"""


def add_commands(sub) -> None:
    from .schedulers import SCHEDULERS

    p = sub.add_parser("tune", help="sweep a recipe's knobs with Ray Tune (ASHA / PBT), scored by kNN top-1",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a registered recipe (see `sslab recipes`)")
    add_data_arguments(p, DATA_HELP + " (sets data.path)")
    p.add_argument("--space", action="append", default=[], metavar="SPEC",
                   help="what to tune: named spaces and KEY=DIST:VALUES ranges (see below)")
    p.add_argument("--samples", type=int, default=0,
                   help="trials to draw (random/optuna; default 8); with grid: ranges, repeats of the grid "
                   "(default 1)")
    p.add_argument("--scheduler", default="asha", choices=SCHEDULERS.names(),
                   help="; ".join(f"{n}: {SCHEDULERS.get(n).summary}" for n in SCHEDULERS.names()))
    p.add_argument("--search", default="auto", choices=["auto", "random", "grid", "optuna"],
                   help="auto: grid when every range is a choice, random otherwise; optuna needs sslab[tune]")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers of each trial (sets engine.workers; "
                   "default 1)")
    p.add_argument("--concurrent", type=int, default=0, help="trials at once (default: what the resources hold)")
    p.add_argument("--epochs", type=int, help="epochs per trial; sets engine.epochs")
    p.add_argument("--batch-size", type=int, help="global batch of each trial; sets engine.batch_size")
    p.add_argument("--preset", help="YAML preset every trial starts from")
    p.add_argument("--gpu", action="store_true", help="one GPU per Train worker; sets engine.use_gpu")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: 1/R of the trials pass each rung")
    p.add_argument("--interval", type=int, default=1, help="PBT: epochs between exploit/explore steps")
    p.add_argument("--name", help="sweep name; an existing one is resumed with its stored definition")
    p.add_argument("--resume", action="store_true", help="resume the latest sweep of RECIPE (or --name)")
    p.add_argument("--storage", help="where sweeps live: a path or a URI (default ./runs or $SSLAB_STORAGE)")
    p.add_argument("--address", help="join a Ray cluster (auto or ray://host:10001) instead of a local instance")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides every trial shares, e.g. engine.base_lr=0.3 model.width=16")
    p.set_defaults(fn=cmd_tune)


def base_overrides(args) -> dict:
    from ..platform.spec import make_run_spec, preset_overrides

    base = preset_overrides(args.preset, args.recipe) if args.preset else {}
    base.update(parse_overrides(args.overrides))
    for flag, key in (("data", "data.path"), ("epochs", "engine.epochs"), ("batch_size", "engine.batch_size"),
                      ("workers_per_trial", "engine.workers")):
        if getattr(args, flag, None) is not None:
            base[key] = getattr(args, flag)
    if args.gpu:
        base["engine.use_gpu"] = True
    base.setdefault("engine.workers", 1)
    # typed and checked now (an unknown key fails here); data.path made absolute: trials run elsewhere
    # (a raw image folder as --data becomes its prepared copy, after that check)
    flat = make_run_spec(args.recipe, base, prepared_dir=args.prepared_dir).flat()
    return {k: list(flat[k]) if isinstance(flat[k], tuple) else flat[k] for k in base}


def sweep_from_args(args):
    """A new sweep from the flags, or the stored one when --name / --resume points at an existing sweep."""
    from ..platform.runs import resolve_storage
    from .runner import DEFINITION, Sweep, default_name, latest_sweep
    from .spaces import parse_space, resolve

    storage = resolve_storage(args.storage)
    name = args.name
    if args.resume and not name:
        name = latest_sweep(storage, args.recipe)
        if not name:
            raise ConfigError(f"--resume: no sweep of {args.recipe} under {storage}")
    if name and os.path.isfile(os.path.join(storage, name, DEFINITION)):
        sweep = Sweep.load(os.path.join(storage, name))
        if sweep.recipe != args.recipe:
            raise ConfigError(f"sweep {name} tunes {sweep.recipe}, not {args.recipe}")
        sweep.storage, sweep.name = storage, name
        print(f"[sslab] sweep {name} exists: resuming it with its stored space, overrides and concurrency")
        return sweep
    if args.resume:
        raise ConfigError(f"--resume: no sweep named {name} under {storage}")
    base = base_overrides(args)
    space = resolve(args.recipe, parse_space(args.space), base)
    return Sweep(args.recipe, base, space, name=name or default_name(args.recipe), storage=storage,
                 scheduler=args.scheduler, search=args.search, samples=args.samples, concurrent=args.concurrent,
                 grace_period=args.grace_period, reduction_factor=args.reduction_factor, interval=args.interval)


def cmd_tune(args) -> int:
    from .report import write_report
    from .runner import run_sweep

    sweep = sweep_from_args(args)
    grid = run_sweep(sweep, address=args.address)
    report = write_report(sweep, grid)
    return 0 if report["best"] is not None and not report["unfinished"] else 1
