"""Real tiny sweeps through a local Ray: every trial is a Ray Train run on the tiny dataset."""
import glob
import os

import pytest
import torch

from sslab.platform.checkpoint import STATE_FILE
from sslab.tuning.report import write_report
from sslab.tuning.runner import Sweep, run_sweep
from sslab.tuning.spaces import parse_space, resolve

pytestmark = pytest.mark.ray

TINY = {"engine.epochs": 2, "engine.batch_size": 16, "engine.steps_per_epoch": 2, "engine.workers": 1,
        "engine.cpus_per_worker": 0.5, "data.cpus_per_task": 0.5, "engine.knn_k": 10, "engine.log_every": 100,
        "model.width": 4, "data.limit": 32, "data.batch_rows": 32, "recipe.hidden": 16, "recipe.dim": 8}


def _states(run_dir):
    """The run's checkpoints' states, by epoch (0-based, as the engine stores it)."""
    states = [torch.load(p, weights_only=True) for p in glob.glob(os.path.join(run_dir, "checkpoint_*", STATE_FILE))]
    return {s["epoch"]: s for s in states}


def test_asha_stops_a_lagging_trial_and_reports_a_failed_one(local_ray, tiny_dataset, tmp_path):
    base = {**TINY, "data.path": tiny_dataset}
    # Tune's grid varies the first key fastest: (0, 0) is healthy; (1, 0) "collapses" at epoch 1 (a threshold
    # of 1 is above any collapse score); (0, 1) lags: a kNN bank of one image scores the share of one class;
    # (1, 1) does both. Two at a time, so the lagging trials reach ASHA's first rung after a healthy score.
    space = resolve("simclr", parse_space(["engine.collapse_threshold=grid:0,1,engine.knn_bank=grid:0,1,"
                                           "temperature"]), base)
    sweep = Sweep("simclr", base, space, name="asha", storage=str(tmp_path), samples=1,
                  concurrent=2)
    out = write_report(sweep, run_sweep(sweep))
    rows = {(r.knobs["engine.collapse_threshold"], r.knobs["engine.knn_bank"]): r for r in out["rows"]}
    assert len(rows) == 4
    good, collapsed, lagging = rows[(0, 0)], rows[(1, 0)], rows[(0, 1)]
    assert (good.status, good.epochs) == ("done", 2) and good.final > lagging.final
    assert (lagging.status, lagging.epochs) == ("stopped", 1)  # ASHA ended its Train run after epoch 1
    assert collapsed.status == "failed" and "representation collapsed" in collapsed.reason
    assert out["best"] is good and os.path.isdir(good.checkpoint)

    files = out["files"]
    for name in ("csv", "markdown", "preset", "png:recipe.temperature", "png:engine.knn_bank"):
        assert os.path.getsize(files[name]) > 0
    text = open(files["csv"]).read() + open(files["markdown"]).read()
    assert all(text.count(r.trial) >= 2 for r in out["rows"])  # every trial in both tables
    assert set(os.listdir(files["hparams"])) >= {r.trial for r in out["rows"]}

    # the same sweep again is a resume: Tune restores the finished experiment and runs nothing new
    again = write_report(sweep, run_sweep(sweep))
    assert [(r.trial, r.status, r.epochs) for r in again["rows"]] == [(r.trial, r.status, r.epochs)
                                                                     for r in out["rows"]]


def test_pbt_exploit_clones_the_leaders_weights_and_queue(local_ray, tiny_dataset, tmp_path):
    # MoCo v2 with a 64-key queue (4 batches): each 2-step segment enqueues 32 keys, so after the clone's
    # segment half of its queue must still be the donor's, bit for bit. Different seeds make the trials'
    # weights and queues differ before the exploit.
    base = {**TINY, "data.path": tiny_dataset, "recipe.queue_size": 64}
    space = resolve("mocov2", parse_space(["engine.seed=grid:1,2,temperature,momentum"]), base)
    sweep = Sweep("mocov2", base, space, name="pbt", storage=str(tmp_path), scheduler="pbt", interval=1,
                  samples=1, concurrent=2)
    grid = run_sweep(sweep)
    out = write_report(sweep, grid)
    assert [(r.status, r.epochs) for r in out["rows"]] == [("done", 2), ("done", 2)]
    (clone,) = [r for r in out["rows"] if r.exploits]  # 2 trials: the lower one clones the upper one, once
    (donor,) = [r for r in out["rows"] if r is not clone]
    assert clone.exploits[0].startswith(f"cloned {donor.trial} after epoch 1: ")
    assert "recipe.temperature" in clone.exploits[0] and "recipe.momentum" in clone.exploits[0]

    (result,) = [r for r in grid if os.path.basename(r.path) == clone.trial]
    last = result.metrics_dataframe.iloc[-1]
    donor_state = torch.load(os.path.join(last["resumed_from"], STATE_FILE), weights_only=True)
    after = _states(os.path.join(sweep.runs, last["train_run"]))[1]  # the clone's segment from the donor's state
    own = _states(os.path.join(sweep.runs, clone.trial))[0]         # the clone's own state before the exploit
    assert donor_state["epoch"] == 0 and donor_state["spec"]["engine"]["seed"] != own["spec"]["engine"]["seed"]
    assert after["global_step"] == donor_state["global_step"] + 2
    assert after["spec"]["recipe"]["temperature"] == pytest.approx(clone.knobs["recipe.temperature"])

    q_donor, q_after, q_own = (s["recipe"]["queue"] for s in (donor_state, after, own))
    assert int(donor_state["recipe"]["queue_ptr"]) == 32 and int(after["recipe"]["queue_ptr"]) == 0
    assert torch.equal(q_after[:32], q_donor[:32])  # the donor's keys, kept: rows 32-63 took the new ones
    assert not torch.allclose(q_after[:32], q_own[:32])
    for name in ("backbone.body.0.weight", "key_backbone.body.0.weight"):  # weights and momentum encoder
        w_after, w_donor, w_own = (s["recipe"][name] for s in (after, donor_state, own))
        assert (w_after - w_donor).norm() < 0.5 * (w_after - w_own).norm()
