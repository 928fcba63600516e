"""The one owner of the checkpoint layout: what a checkpoint directory holds, how it is written and read, how the
latest one of a run is found, and how a trained recipe is rebuilt from it.

    CHECKPOINT/state.pt          torch.save({"recipe": state_dict, "optimizer": state_dict, "epoch": last finished
                                 epoch (0-based), "global_step": int, "spec": RunSpec.to_dict()})
    CHECKPOINT/checkpoint.json   {"files": {"state.pt": {"bytes", "sha256"}}, "epoch", "global_step"}, written last:
                                 a checkpoint is complete when it is there and the files match it

Only tensors and plain data: it loads with `weights_only=True`, so reading a checkpoint never runs code from it.
Ray Train names a run's checkpoints `checkpoint_<date>_<time>` (the local context names them the same way), so
name order is time order. Resuming and evaluating take the newest checkpoint that verifies; a corrupt or
incomplete one is skipped with a warning naming it. (Checkpoints from before checkpoint.json count as complete when
their state.pt is a whole archive.)
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

import torch

from ..config import ConfigError
from ..datasets.shards import read_manifest, sha256_file
from .spec import RunSpec, build_recipe

STATE_FILE = "state.pt"
INDEX_FILE = "checkpoint.json"


def save_state(path: str, recipe, optimizer, epoch: int, step: int, spec: RunSpec) -> None:
    state = os.path.join(path, STATE_FILE)
    torch.save({"recipe": recipe.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "global_step": step, "spec": spec.to_dict()}, state)
    index = {"files": {STATE_FILE: {"bytes": os.path.getsize(state), "sha256": sha256_file(state)}}, "epoch": epoch,
             "global_step": step}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f)


def verify(path: str) -> str | None:
    """Why the checkpoint directory `path` cannot be used (missing, incomplete, corrupt), or None if it can."""
    state = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state):
        return f"no {STATE_FILE}"
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):        # written before checkpoint.json existed: a whole zip archive is enough
        return None if zipfile.is_zipfile(state) else f"{STATE_FILE} is not a whole archive (truncated?)"
    try:
        with open(index) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{INDEX_FILE} is unreadable"
    for name, want in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != want["bytes"]:
            return f"{name} has {os.path.getsize(file)} bytes, {INDEX_FILE} says {want['bytes']}"
        if sha256_file(file) != want["sha256"]:
            return f"{name}'s sha256 differs from {INDEX_FILE}"
    return None


@contextlib.contextmanager
def newest_usable(candidates: Iterable[tuple[str, Callable[[], ContextManager[str]]]],
                  log: Callable[[str], None] = print) -> Iterator[tuple[str | None, str | None]]:
    """Yields (local directory, its name) of the first checkpoint of `candidates` that verifies, newest first;
    each candidate is (name, opener), `opener()` a context manager giving a local directory. Skipped ones are
    logged by name. (None, None) when there are none; ValueError when there are some and none verifies."""
    skipped = []
    for name, opener in candidates:
        with opener() as directory:
            why = verify(directory)
            if why is None:
                for bad, reason in skipped:
                    log(f"[sslab] warning: skipped checkpoint {bad} ({reason}); using {name}")
                yield directory, name
                return
        skipped.append((name, why))
    if skipped:
        raise ValueError("no usable checkpoint: " + "; ".join(f"{n} ({why})" for n, why in skipped) +
                         ". Move them out of the run directory to start the run again")
    yield None, None


def load_state(path: str, map_location="cpu") -> dict:
    """The state of the checkpoint directory `path`. Tensors and plain data only: a file holding anything else
    (code included) is refused with one line naming it."""
    file = os.path.join(path, STATE_FILE)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such checkpoint file") from None
    except pickle.UnpicklingError as e:  # an object other than tensors and plain data: refused, never loaded
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a {found.group(1)}" if found else "an object"
        raise ValueError(f"{file}: refused: it holds {what} besides tensors and plain data, and loading that could "
                         f"run code from the file") from None
    except Exception as e:  # truncated zip, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a readable sslab checkpoint ({type(e).__name__}: {reason[:200]})") from None


def find_checkpoint(path: str, log: Callable[[str], None] = print) -> str:
    """`path` is a checkpoint directory or a run directory: its newest checkpoint_* that verifies (others are
    skipped with a warning)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE)):
        why = verify(path)
        if why:
            raise ValueError(f"{path}: not a usable checkpoint ({why})")
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} holds neither {STATE_FILE} nor checkpoint_*/{STATE_FILE}: pass a checkpoint "
                                f"directory or a run directory made by `sslab train`")
    with newest_usable(((d, lambda d=d: contextlib.nullcontext(d)) for d in reversed(found)), log) as (d, _):
        return d


def checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint directories (complete or not), oldest first."""
    return sorted(d for d in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(d))


@dataclass
class Trained:
    """A checkpoint's recipe and encoder, ready to evaluate or export."""
    path: str                 # the checkpoint directory
    run_dir: str              # the run directory holding it (TensorBoard lives there)
    spec: RunSpec
    epoch: int                # epochs trained
    recipe: torch.nn.Module
    encoder: torch.nn.Module
    manifest: object          # the evaluation data's Manifest
    image_size: int           # the side of the views the encoder was trained on
    mean: tuple               # the training data's normalisation
    std: tuple


def load_trained(checkpoint: str, data_dir: str | None = None) -> Trained:
    """Rebuild a run's recipe from its checkpoint (weights loaded strictly) and take `recipe.encoder()`.
    `data_dir` is the evaluation data (default: the run's own). The recipe is built against the training data's
    manifest when it is still there (memory banks are sized by it), else against the evaluation data's."""
    path = find_checkpoint(checkpoint)
    state = load_state(path)
    spec = RunSpec.from_dict(state["spec"])
    data = data_dir or spec.data.path
    if not data:
        raise ValueError(f"{path}: the run names no data directory; pass --data DIR")
    manifest = read_manifest(data)
    train_manifest = read_manifest(spec.data.path) if os.path.isfile(os.path.join(spec.data.path, "manifest.json")) \
        else manifest
    size = spec.data.crop_size or train_manifest.image_size[0]
    if manifest.channels != train_manifest.channels:
        raise ValueError(f"{data} has {manifest.channels}-channel images; the encoder was trained on "
                         f"{train_manifest.channels} channels")
    recipe = build_recipe(spec, train_manifest, size)
    try:
        recipe.load_state_dict(state["recipe"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit recipe {spec.recipe_name} as built from the checkpoint's "
                         f"config ({str(e).splitlines()[0]})") from None
    recipe.eval()
    parent = os.path.dirname(os.path.abspath(path))
    run_dir = parent if os.path.basename(os.path.abspath(path)).startswith("checkpoint_") else os.path.abspath(path)
    return Trained(path, run_dir, spec, state["epoch"] + 1, recipe, recipe.encoder(), manifest, size,
                   tuple(train_manifest.mean), tuple(train_manifest.std))


def check_resumable(run_dir: str, spec: RunSpec) -> str | None:
    """Before a run named like an existing one starts (local storage): its newest usable checkpoint must load into
    the recipe `spec` builds. Refuses another recipe, or a model or recipe config the weights do not fit, naming
    both; returns the checkpoint the run will resume from (None for a new run)."""
    if "://" in run_dir or not checkpoints(run_dir):
        return None
    try:
        path = find_checkpoint(run_dir)
        state = load_state(path)
    except ValueError as e:                              # none usable: a usage error, found before Ray starts
        raise ConfigError(f"run {run_dir}: {e}") from None
    old = RunSpec.from_dict(state["spec"])
    if old.recipe_name != spec.recipe_name:
        raise ConfigError(f"run {run_dir} holds recipe {old.recipe_name} ({path}); this command trains "
                         f"{spec.recipe_name}: pick another --name to start a new run")
    manifest = read_manifest(spec.data.path)
    recipe = build_recipe(spec, manifest, spec.data.crop_size or manifest.image_size[0])
    try:
        recipe.load_state_dict(state["recipe"])
    except RuntimeError as e:
        changed = [f"{k} {a!r} -> {b!r}" for k, a in old.flat().items() if k.startswith(("model.", "recipe."))
                   for b in [spec.flat()[k]] if a != b]
        raise ConfigError(f"run {run_dir}'s checkpoint {path} does not fit this command's {spec.recipe_name} "
                         f"({', '.join(changed) or str(e).splitlines()[0]}): pick another --name to start a new "
                         f"run") from None
    return path
