"""Population Based Training that really exploits (Jaderberg et al., "Population Based Training of Neural
Networks", 2017): a trial trains in segments of `interval` epochs, reports each segment's end to Tune *with* its
checkpoint, and a lagging trial restarts from a leader's checkpoint with perturbed hyperparameters.

A segment is one `fit()` that stops after an epoch (`train(..., stop_after_epoch=)`) while its schedules still span
`engine.epochs`. A trial that starts from a Tune checkpoint — a clone after an exploit, or its own after a pause —
starts a new Train run from it (`train(..., start_from=)`), so the clone carries everything the engine checkpoints:
weights, optimizer and every recipe buffer (queue, momentum encoder, memory bank, centre). Only continuous
ranges are perturbed; choices (which may size a queue or a head) travel unchanged with the cloned config.
"""
from __future__ import annotations

import hashlib
import json

from ray.tune.schedulers import PopulationBasedTraining

from . import spaces


class ClipToSpace:
    """PBT's explore multiplies values by 0.8 / 1.2: keep them inside their ranges (picklable for a resume)."""

    def __init__(self, space):
        self.space = space

    def __call__(self, config: dict) -> dict:
        for r in self.space:
            if r.name in config:
                config[r.name] = r.clip(config[r.name])
        return config


class SegmentPBT(PopulationBasedTraining):
    """Ray's PBT, minus the exploit at the last epoch: a trial that has finished has nothing left to gain from
    a clone, and its row would show the donor's results instead of its own."""

    def __init__(self, last_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch", 0) >= self.last_epoch:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_pbt(sweep) -> SegmentPBT:
    # synch: every trial reaches the segment's end before the bottom quarter clones the top quarter, so an
    # exploit compares trials at the same epoch
    return SegmentPBT(sweep.epochs, time_attr="epoch", perturbation_interval=sweep.interval,
                      hyperparam_mutations=spaces.mutations(sweep.space), custom_explore_fn=ClipToSpace(sweep.space),
                      quantile_fraction=0.25, resample_probability=0.25, synch=True, log_config=True)


def checkpoint_uri(ckpt) -> str:
    fs = getattr(ckpt.filesystem, "type_name", "local")
    return ckpt.path if fs == "local" else f"{fs}://{ckpt.path}"


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe_changes(before: dict, after: dict) -> str:
    changed = [f"{k} {fmt(before.get(k))} -> {fmt(v)}" for k, v in after.items() if before.get(k) != v]
    return ", ".join(changed) or "no change"


def segment_driver(config: dict, sweep) -> None:
    """A PBT trial: Train segments, each reported to Tune with its checkpoint and the trial's knobs in the
    checkpoint's metadata (so a clone can tell whose state it carries and what its explore step changed)."""
    from ray import tune

    from ..platform.launch import train

    trial = tune.get_context().get_trial_name()
    overrides = spaces.overrides_for(sweep.space, config)
    knobs = {r.key: overrides[r.key] for r in sweep.space}
    epoch, resume, run, exploit = 0, "", trial, ""
    start = tune.get_checkpoint()
    if start is not None:
        meta = start.get_metadata()
        epoch, resume = int(meta["epoch"]), checkpoint_uri(start)
        digest = hashlib.sha1(json.dumps([resume, knobs], sort_keys=True).encode()).hexdigest()[:6]
        run = f"{trial}-e{epoch}-{digest}"  # deterministic: a restarted segment resumes its own run
        if meta["trial"] != trial:
            exploit = f"cloned {meta['trial']} after epoch {epoch}: {describe_changes(meta['knobs'], knobs)}"
            print(f"[sslab] PBT exploit: trial {trial} {exploit} (its state from {resume})", flush=True)
    epochs = sweep.epochs
    while epoch < epochs:
        stop = min(epochs, (epoch // sweep.interval + 1) * sweep.interval)
        result = train(sweep.spec(overrides), name=run, storage=sweep.runs, stop_after_epoch=stop, start_from=resume)
        if not result.metrics or result.checkpoint is None:
            raise RuntimeError(f"Train run {run} reported nothing for epochs {epoch + 1}-{stop}")
        metrics = dict(result.metrics)
        ckpt = tune.Checkpoint(result.checkpoint.path, result.checkpoint.filesystem)
        ckpt.set_metadata({"trial": trial, "epoch": metrics["epoch"], "knobs": knobs, "run": run})
        metrics.update(train_run=run, exploit=exploit, resumed_from=resume)
        tune.report(metrics, checkpoint=ckpt)
        epoch, exploit = metrics["epoch"], ""
