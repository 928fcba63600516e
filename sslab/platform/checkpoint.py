"""The one owner of the checkpoint layout: what a checkpoint directory holds, how it is written and read, how the
latest one of a run is found, and how a trained recipe is rebuilt from it.

    CHECKPOINT/state.pt   torch.save({"recipe": state_dict, "optimizer": state_dict, "epoch": last finished epoch
                          (0-based), "global_step": int, "spec": RunSpec.to_dict()})

Only tensors and plain data: it loads with `weights_only=True`, so reading a checkpoint never runs code from it.
Ray Train names a run's checkpoints `checkpoint_<date>_<time>` (the local context numbers them the same way), so
name order is time order.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from ..datasets.shards import read_manifest
from .spec import RunSpec, build_recipe

STATE_FILE = "state.pt"


def save_state(path: str, recipe, optimizer, epoch: int, step: int, spec: RunSpec) -> None:
    torch.save({"recipe": recipe.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "global_step": step, "spec": spec.to_dict()}, os.path.join(path, STATE_FILE))


def load_state(path: str, map_location="cpu") -> dict:
    """The state of the checkpoint directory `path`. Tensors and plain data only: a file holding anything else
    (code included) is refused with one line naming it."""
    file = os.path.join(path, STATE_FILE)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such checkpoint file") from None
    except Exception as e:  # truncated zip, a pickle with code in it, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a readable sslab checkpoint ({type(e).__name__}: {reason[:200]})") from None


def find_checkpoint(path: str) -> str:
    """`path` is a checkpoint directory (holds state.pt) or a run directory: its latest checkpoint_*."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} holds neither {STATE_FILE} nor checkpoint_*/{STATE_FILE}: pass a checkpoint "
                                f"directory or a run directory made by `sslab train`")
    return found[-1]


def checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint directories holding a state file, oldest first."""
    return sorted(d for d in glob.glob(os.path.join(run_dir, "checkpoint_*"))
                  if os.path.isfile(os.path.join(d, STATE_FILE)))


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
