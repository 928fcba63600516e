"""A Train worker process dies mid-epoch; the group restarts from the last checkpoint and the run completes.

The fault is injected by a loop callback defined here (`fault_at`): the last rank calls os._exit(1) before a given
step, the first time only (a marker in the run directory keeps the restarted group alive). `pytest -s` prints the
cost.
"""
import json
import math
import os

import pytest
import torch

from sslab.platform.checkpoint import STATE_FILE
from sslab.platform.launch import train
from sslab.platform.spec import make_spec

pytestmark = pytest.mark.ray

EPOCHS, SPE = 2, 2     # 2 steps an epoch: checkpoints after steps 2 and 4
FAULT_STEP = 4         # dies before the 4th step: epoch 2 is half done, the last checkpoint is epoch 1's


def fault_at(step: int, run_dir: str):
    """A loop callback: the last rank's process dies before global step `step` (1-based), the first time only, as
    a lost worker would. A marker in the run directory (shared by every node) keeps the restarted group alive.
    Defined inside a function so Ray pickles the class by value into its workers."""
    import time

    from sslab.platform.callbacks import Callback

    class InjectFault(Callback):
        def on_step_start(self, trainer, at):
            rank, world = trainer.ctx.rank, trainer.ctx.world_size
            marker = os.path.join(run_dir, "fault_injected")
            if at != step - 1 or rank != world - 1 or os.path.exists(marker):
                return
            # Train's controller collects reports (checkpoints) by polling every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
            # (2 s): a worker lost sooner than that after a report can take the report with it, and the run then
            # resumes from the checkpoint before. Wait out two polls, so the fault lands where a real one usually
            # does, long after the last checkpoint.
            time.sleep(2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
            os.makedirs(run_dir, exist_ok=True)
            with open(marker, "w") as f:
                f.write(f"rank {rank} exited before step {at + 1} at {time.time():.3f}\n")
            print(f"[sslab] fault injected: rank {rank} exits before step {at + 1}", flush=True)
            os._exit(1)

    return InjectFault()


FAST = {"engine.batch_size": 16, "engine.workers": 2, "engine.cpus_per_worker": 0.5, "engine.epochs": EPOCHS,
        "engine.steps_per_epoch": SPE, "engine.knn_every": 0, "engine.checkpoint_keep": EPOCHS,
        "model.width": 4, "recipe.hidden": 16, "recipe.dim": 8, "data.limit": 32, "data.batch_rows": 32}


def report_log(path: str):
    """A Train callback (it runs in Train's controller) appending every report's epoch and wall time to `path`:
    all reports, with or without a checkpoint, in the order the controller received them."""
    import time

    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": metrics[0]["epoch"], "step": metrics[0]["step"],
                                    "epoch_s": metrics[0]["epoch_s"], "t": time.time()}) + "\n")

    return ReportLog()


def forwarded_output(capfd, expect: str, wait_s: float = 30.0) -> str:
    """Everything printed so far, workers' lines included. Ray forwards worker output to the driver
    asynchronously, so a short run can return before its last lines arrive: read until `expect` shows up (or
    `wait_s` passes; the assertion on it then fails with what was printed)."""
    import time

    printed, deadline = "", time.monotonic() + wait_s
    while True:
        out = capfd.readouterr()
        printed += out.out + out.err
        if expect in printed or time.monotonic() > deadline:
            return printed
        time.sleep(0.5)


def _counters(state: dict) -> dict:
    """The recipe's integer state: deterministic, unlike weights (augmentation draws are random). For SimCLR,
    BatchNorm's num_batches_tracked: one count per training forward pass actually taken."""
    return {k: v for k, v in state["recipe"].items() if not v.is_floating_point()}


def test_killed_worker_resumes_from_last_checkpoint(local_ray, tiny_dataset, tmp_path, capfd):
    storage, log = str(tmp_path / "runs"), str(tmp_path / "reports.jsonl")
    spec = make_spec("simclr", {"data.path": tiny_dataset, **FAST, "engine.max_failures": 1})
    result = train(spec, name="faulty", storage=storage, callbacks=[report_log(log)],
                   worker_callbacks=[fault_at(FAULT_STEP, os.path.join(storage, "faulty"))])
    printed = forwarded_output(capfd, "resumed from checkpoint")

    assert result.error is None
    # the fault happened: the last rank wrote its marker and died; the restarted group resumed from the
    # checkpoint of epoch 1 (step 2), not from scratch
    marker = open(os.path.join(storage, "faulty", "fault_injected")).read()
    assert marker.startswith(f"rank 1 exited before step {FAULT_STEP}")
    assert f"fault injected: rank 1 exits before step {FAULT_STEP}" in printed
    assert "resumed from checkpoint after epoch 1 (step 2)" in printed

    # every epoch reported exactly once, in order: the half-done epoch 2 was redone once, and epoch 1, before
    # the last checkpoint, was not redone (a restart from scratch would report epoch 1 twice)
    reports = [json.loads(line) for line in open(log)]
    assert [(r["epoch"], r["step"]) for r in reports] == [(1, 2), (2, 4)]
    assert result.metrics_dataframe["epoch"].tolist() == [1, 2]  # and checkpointed once each
    assert all(math.isfinite(v) for v in result.metrics_dataframe["loss"])

    # the final state is the one a run without the fault reaches: epoch, step counter and the recipe's integer
    # state. An uninterrupted run takes SPE steps every epoch, so its counters after epoch e are e times those
    # after epoch 1; a resume that lost or repeated state (buffers not restored, steps counted twice) breaks that
    states = [torch.load(os.path.join(c.path, STATE_FILE), weights_only=True) for c, _ in result.best_checkpoints]
    assert [(s["epoch"], s["global_step"]) for s in states] == [(e, (e + 1) * SPE) for e in range(EPOCHS)]
    first, final = _counters(states[0]), _counters(states[-1])
    assert first and all(v.sum() > 0 for v in first.values()), "the recipe has integer state to compare"
    assert set(final) == set(first)
    for k, v in first.items():
        assert torch.equal(final[k], v * EPOCHS), k

    # the cost: the part of epoch 2 done before the fault (redone) plus the restart (the dead worker noticed,
    # a new group started, the checkpoint loaded, the data stream restarted)
    t_fault = float(marker.split(" at ")[-1])
    redo_start = reports[1]["t"] - reports[1]["epoch_s"]
    lost, restart = t_fault - reports[0]["t"], redo_start - t_fault
    assert lost > 0 and restart > 0
    print(f"\n[fault cost] {lost + restart:.1f} s lost: {lost:.1f} s of epoch 2 done before the fault and redone, "
          f"{restart:.1f} s restarting; epoch times {[round(r['epoch_s'], 1) for r in reports]} s; "
          f"1 of {EPOCHS} epochs redone, 0 before the checkpoint")
