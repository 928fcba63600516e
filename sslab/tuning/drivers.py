"""Trial drivers: the function each Tune trial runs. A trial is one or more Ray Train runs started through
`sslab.platform.launch.train`, the same entry point as `sslab train` (RAY_NOTES: "Tune drives Train through a
driver function"); which driver a sweep uses is its scheduler's choice (schedulers.py)."""
from __future__ import annotations

import hashlib
import json

from . import spaces


def stream_driver(config: dict, sweep) -> None:
    """One trial = one Train run; the rank-0 metrics of every epoch reach Tune through TuneReportCallback, so
    ASHA can stop the trial (Tune ends this actor, and the Train controller it owns goes with it). The run's
    name is the trial's: a trial restarted by a sweep resume continues its Train run from the last checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..platform.launch import train

    name = tune.get_context().get_trial_name()
    spec = sweep.spec(spaces.overrides_for(sweep.space, config))
    train(spec, name=name, storage=sweep.runs, callbacks=[TuneReportCallback()])


def checkpoint_uri(ckpt) -> str:
    fs = getattr(ckpt.filesystem, "type_name", "local")
    return ckpt.path if fs == "local" else f"{fs}://{ckpt.path}"


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe_changes(before: dict, after: dict) -> str:
    changed = [f"{k} {fmt(before.get(k))} -> {fmt(v)}" for k, v in after.items() if before.get(k) != v]
    return ", ".join(changed) or "no change"


def segment_driver(config: dict, sweep) -> None:
    """A trial in segments of `sweep.interval` epochs (PBT): each segment is one `fit()` that stops after an epoch
    (`train(..., stop_after_epoch=)`) while its schedules still span all epochs, reported to Tune with its
    checkpoint and the trial's knobs in the checkpoint's metadata (so a clone can tell whose state it carries and
    what its explore step changed). A trial that starts from a Tune checkpoint -- a clone after an exploit, or its
    own after a pause -- starts a new Train run from it (`train(..., start_from=)`), so the clone carries
    everything the loop checkpoints: weights, optimizer and every recipe buffer."""
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
