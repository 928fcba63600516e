"""The `sslab` command: parses, validates, calls. Everything it runs is importable from the package."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .config import ConfigError, parse_overrides
from .datasets.cache import DATA_HELP, add_data_arguments

# modules adding their own sub-commands: each defines add_commands(subparsers), registering parsers whose
# `fn` default is called with the parsed args (see the train parser below for the shape)
EXTENSIONS: list[str] = ["sslab.platform.eval_cli", "sslab.platform.runs", "sslab.platform.embed", "sslab.tuning.cli",
                         "sslab.bench.cli"]


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a registered recipe (see `sslab recipes`)")
    add_data_arguments(p, DATA_HELP + " (sets data.path)")
    p.add_argument("--preset", help="YAML preset: a file, or a built-in name (e.g. demo)")
    p.add_argument("--epochs", type=int, help="sets engine.epochs")
    p.add_argument("--batch-size", type=int, help="global batch; sets engine.batch_size")
    p.add_argument("--workers", type=int, help="Ray Train workers; sets engine.workers (0 = what fits)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); sets engine.use_gpu")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. recipe.temperature=0.2 data.strength=0.5")


def _spec_from_args(args, resolve_data: bool = True):
    """The run's spec from the flags, every key checked first; then, with `resolve_data`, a raw image folder given
    as --data is replaced by its prepared copy (training needs it; `sslab config` only shows the path)."""
    from .platform.spec import make_run_spec, make_spec

    overrides = parse_overrides(args.overrides)
    for flag, key in (("data", "data.path"), ("epochs", "engine.epochs"), ("batch_size", "engine.batch_size"),
                      ("workers", "engine.workers")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if getattr(args, "gpu", False):
        overrides["engine.use_gpu"] = True
    if resolve_data:
        return make_run_spec(args.recipe, overrides, args.preset, getattr(args, "prepared_dir", None))
    return make_spec(args.recipe, overrides, args.preset)


def cmd_recipes(args) -> int:
    from .recipes import registry

    for name in registry.names():
        print(f"{name:12s} {registry.get(name).summary}")
    return 0


def cmd_config(args) -> int:
    """Print the resolved config (defaults < recipe's paper settings < preset < overrides)."""
    from .config import describe
    from .platform.spec import SECTIONS
    from .recipes import registry

    spec = _spec_from_args(args, resolve_data=False)
    helps = {f"{s}.{n}": h for s, cls in (SECTIONS | {"recipe": registry.get(args.recipe).config}).items()
             for n, _, h in describe(cls)}
    for key, value in spec.flat().items():
        print(f"{key} = {value!r:<14}  # {helps.get(key, '')}")
    return 0


def cmd_train(args) -> int:
    from .platform.launch import train
    from .platform.report import failure_line, summarize

    spec = _spec_from_args(args)
    try:
        result = train(spec, name=args.name, storage=args.storage, address=args.address, verbose=args.verbose)
    except (ConfigError, FileNotFoundError, FileExistsError):
        raise  # found before any cluster time was spent: main() prints them as usage errors
    except Exception as e:  # Ray Train's worker-group failure: its message carries the workers' tracebacks
        print(failure_line(e), file=sys.stderr)
        return 1
    return summarize(result)


def cmd_data_prepare(args) -> int:
    from .datasets import shards, sources

    src = sources.build(args.source, args.src or args.root, size=args.size, channels=args.channels,
                        test_fraction=args.test_fraction)
    summary = shards.prepare(src, args.out, force=args.force, encoding=args.encoding)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_info(args) -> int:
    from .datasets.shards import read_manifest

    m = read_manifest(args.dir)
    print(f"{args.dir}: {m.count('train')} train / {m.count('test')} test images, {m.image_size[0]}x"
          f"{m.image_size[1]}x{m.channels}, {m.num_classes} classes, mean {m.mean}, std {m.std}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslab", description="Pretrain, compare and tune self-supervised image "
                                "encoders on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("recipes", help="list the registered recipes")
    s.set_defaults(fn=cmd_recipes)

    s = sub.add_parser("config", help="print a recipe's resolved config with each key's meaning")
    _add_run_args(s)
    s.set_defaults(fn=cmd_config)

    s = sub.add_parser("train", help="pretrain a recipe with Ray Train (resumes when --name exists)")
    _add_run_args(s)
    s.add_argument("--name", help="run name; re-using one resumes it from its latest checkpoint")
    s.add_argument("--storage", help="where runs live: a path or a URI (default ./runs or $SSLAB_STORAGE)")
    s.add_argument("--address", help="join a Ray cluster (auto or ray://host:10001) instead of a local instance")
    s.add_argument("--verbose", action="store_true", help="show Ray's own output too (by default it goes to "
                   "RUN_DIR/ray.log and only sslab's lines and progress are shown)")
    s.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="prepare and inspect datasets").add_subparsers(dest="data_cmd", required=True)
    sources = importlib.import_module("sslab.datasets.sources").SOURCES
    s = d.add_parser("prepare", help="write Parquet shards + manifest from a registered data source",
                     description="sources: " + "; ".join(
                         f"{n}: {sources.get(n).__doc__.strip().splitlines()[0].rstrip('.')}" for n in sources.names()))
    s.add_argument("source", choices=sources.names())
    s.add_argument("src", nargs="?", help="where the source reads from (folder: the image folder; fashion-mnist: "
                   "the IDX files' directory, default: found or downloaded)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--root", help="the same as SRC (kept for fashion-mnist)")
    s.add_argument("--size", type=int, help="folder: images resized on their shorter side and centre-cropped to "
                   "SIZE px (default: inferred, the median shorter side rounded to a multiple of 8, at most 224)")
    s.add_argument("--channels", type=int, choices=[1, 3], help="folder: 1 (grey) or 3 (RGB) (default: inferred, "
                   "1 when every sampled image is grey)")
    s.add_argument("--test-fraction", type=float,
                   help="folder without train/ and test/ sub-folders: share held out for evaluation (default 0.1)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.add_argument("--encoding", choices=("png", "raw"), default="png",
                   help="how images are stored: png (compact for larger photos; decoded when read) or raw uint8 "
                        "pixels (no decoding: faster for small images; zstd-compressed, Fashion-MNIST takes 30 MB raw, "
                        "33 MB as PNG)")
    s.set_defaults(fn=cmd_data_prepare)
    s = d.add_parser("info", help="summarise a prepared dataset")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_data_info)
    for module in EXTENSIONS:
        importlib.import_module(module).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`--epochs 1 recipe.temperature=0.2`); argparse leaves those
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"sslab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
