"""A run's full configuration: engine, model, data and recipe sections, resolved from defaults, the recipe's
paper settings, a preset and dotted overrides, in that order."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..config import ConfigError, asdict, build, knob, load_preset
from ..datasets.pipeline import DataConfig
from ..recipes import registry
from ..recipes.backbones import ModelConfig, build_backbone
from ..recipes.protocol import RecipeContext


@dataclass(frozen=True)
class EngineConfig:
    epochs: int = knob(10, "passes over the training set", min=1)
    batch_size: int = knob(256, "global batch (all workers together); must divide by the worker count", min=2)
    workers: int = knob(0, "Ray Train workers; 0 = what fits (GPUs if use_gpu, else 1 per 2 CPUs)", min=0)
    cpus_per_worker: float = knob(1.0, "logical CPUs each Train worker reserves", min=0.0, min_exclusive=True)
    use_gpu: bool = knob(False, "one GPU per worker, NCCL collectives")
    optimizer: str = knob("sgd", "sgd, lars or adamw", choices=("sgd", "lars", "adamw"))
    base_lr: float = knob(0.05, "learning rate at batch 256 (scaled linearly with the global batch)", min=0.0,
                          min_exclusive=True)
    momentum: float = knob(0.9, "SGD/LARS momentum", min=0.0, max=1.0)
    weight_decay: float = knob(1e-6, "weight decay (not on biases and norm parameters)", min=0.0)
    weight_decay_end: float = knob(-1.0, "cosine weight-decay schedule ends here (DINO); -1 = constant", min=-1.0)
    warmup_epochs: float = knob(1.0, "linear learning-rate warm-up before the cosine decay", min=0.0)
    final_lr_ratio: float = knob(0.0, "cosine decay ends at this fraction of the peak", min=0.0, max=1.0)
    clip_grad: float = knob(0.0, "clip the gradient norm to this value (0 = off)", min=0.0)
    amp: bool = knob(False, "bf16 autocast on GPU")
    channels_last: bool = knob(False, "channels-last memory format on GPU")
    compile: bool = knob(False, "torch.compile the recipe")
    seed: int = knob(0, "seed for initialisation")
    steps_per_epoch: int = knob(0, "cap the steps of an epoch (0 = one full pass); for smoke runs", min=0)
    knn_every: int = knob(1, "run the kNN monitor every N epochs (0 = never)", min=0)
    knn_k: int = knob(200, "kNN neighbours (InstDisc's weighted vote)", min=1)
    knn_t: float = knob(0.1, "kNN vote temperature", min=0.0, min_exclusive=True)
    knn_bank: int = knob(0, "training images in the kNN bank (0 = all)", min=0)
    knn_queries: int = knob(0, "test images queried (0 = all)", min=0)
    diagnostics: int = knob(1024, "training images (the first N) scored every epoch for alignment, uniformity and "
                                  "effective rank (0 = off)", min=0)
    divergence_factor: float = knob(1000.0, "stop when the weights' global L2 norm exceeds this multiple of its value "
                                             "at the run's start (0 = never)", min=0.0)
    collapse_threshold: float = knob(0.02, "stop when std(normalised embedding) * sqrt(d) falls below this "
                                           "(healthy ~1, collapsed 0); 0 = never", min=0.0, max=1.0)
    log_every: int = knob(50, "print a progress line every N steps", min=1)
    checkpoint_keep: int = knob(2, "checkpoints kept in the run directory", min=1)
    max_failures: int = knob(0, "worker-group restarts from the last checkpoint before the run fails", min=0)
    worker_resource: str = knob("", "custom Ray resource each Train worker takes 1 unit of, e.g. one per node "
                                    "(`ray start --resources='{\"NAME\": 1}'`); empty = none")



SECTIONS = {"engine": EngineConfig, "model": ModelConfig, "data": DataConfig}
# keys earlier versions wrote into checkpoints that no longer exist; none of them changed what was trained
RETIRED = {"engine": ("fault_step", "stop_after_epoch", "resume_from")}


@dataclass(frozen=True)
class RunSpec:
    recipe_name: str
    engine: EngineConfig
    model: ModelConfig
    data: DataConfig
    recipe: Any

    def to_dict(self) -> dict:
        return {"recipe_name": self.recipe_name, "engine": asdict(self.engine), "model": asdict(self.model),
                "data": asdict(self.data), "recipe": asdict(self.recipe)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        """A spec as `to_dict` wrote it, also by an earlier sslab: keys since retired are dropped (RETIRED)."""
        info = registry.get(d["recipe_name"])
        sections = {s: {k: v for k, v in d[s].items() if k not in RETIRED.get(s, ())} for s in SECTIONS}
        return cls(d["recipe_name"], *(build(SECTIONS[s], sections[s], s) for s in ("engine", "model", "data")),
                   build(info.config, d["recipe"], "recipe"))

    def flat(self) -> dict[str, Any]:
        d = self.to_dict()
        return {f"{s}.{k}": v for s in ("engine", "model", "data", "recipe") for k, v in d[s].items()}


def recipe_knobs(recipe_name: str) -> dict[str, set[str]]:
    """Every settable key of a recipe's run, {section: field names}; an unknown recipe is a ConfigError."""
    config = registry.get(recipe_name).config
    return {s: {f.name for f in fields(c)} for s, c in (SECTIONS | {"recipe": config}).items()}


def preset_overrides(preset: str, recipe_name: str) -> dict[str, Any]:
    """A preset's flat keys for `recipe_name` (its per-recipe entry merged in), every key checked."""
    return load_preset(preset, recipe_name, recipe_knobs)


def make_spec(recipe_name: str, overrides: dict[str, Any] | None = None, preset: str | None = None) -> RunSpec:
    """Resolve a run's config; every key is checked, and a bad one fails naming the valid choices."""
    info = registry.get(recipe_name)
    flat: dict[str, Any] = {(k if "." in k else f"engine.{k}"): v for k, v in info.engine.items()}
    if preset:
        flat.update(preset_overrides(preset, recipe_name))
    flat.update(overrides or {})
    path = str(flat.get("data.path", ""))
    if path and "://" not in path:
        flat["data.path"] = os.path.abspath(os.path.expanduser(path))  # workers run in another directory
    sections: dict[str, dict] = {s: {} for s in ("engine", "model", "data", "recipe")}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"unknown key {key!r}: keys look like section.name with section one of "
                              f"{', '.join(sections)}")
        sections[section][name] = value
    return RunSpec(recipe_name, *(build(SECTIONS[s], sections[s], s) for s in ("engine", "model", "data")),
                   build(info.config, sections["recipe"], "recipe"))


def make_run_spec(recipe_name: str, overrides: dict[str, Any] | None = None, preset: str | None = None,
                  prepared_dir: str | None = None) -> RunSpec:
    """`make_spec`, every key checked first; then a raw image folder as data.path is replaced by its prepared copy
    (`datasets.cache.resolve_data`), so a typo never costs a prepare."""
    from ..datasets.cache import resolve_data

    spec = make_spec(recipe_name, overrides, preset)
    path = spec.data.path
    if path and "://" not in path:
        prepared = resolve_data(path, prepared_dir)
        if prepared != path:
            spec = make_spec(recipe_name, (overrides or {}) | {"data.path": prepared}, preset)
    return spec


def build_recipe(spec: RunSpec, manifest, image_size: int) -> torch.nn.Module:
    """The recipe `spec` names, built for the data `manifest` describes at `image_size` px (random weights)."""
    info = registry.get(spec.recipe_name)
    ctx = RecipeContext(make_backbone=lambda in_chans=manifest.channels: build_backbone(spec.model, in_chans,
                                                                                       image_size),
                        num_train=manifest.count("train"), channels=manifest.channels, image_size=image_size,
                        epochs=spec.engine.epochs, batch_size=spec.engine.batch_size,
                        mean=tuple(manifest.mean), std=tuple(manifest.std))
    return info.cls(spec.recipe, ctx)


def steps_per_epoch(spec: RunSpec, num_train: int) -> int:
    n = min(num_train, spec.data.limit) if spec.data.limit else num_train
    steps = n // spec.engine.batch_size
    return min(steps, spec.engine.steps_per_epoch) if spec.engine.steps_per_epoch else steps
