"""The sweep report from Tune-like results (no Ray): statuses, reasons, best preset, files."""
import csv
import os

import pandas as pd
import pytest
import yaml
from PIL import Image

from sslab.config import load_preset
from sslab.platform.spec import make_spec
from sslab.tuning import spaces
from sslab.tuning.report import failure_reason, plotted, write_report
from sslab.tuning.runner import Sweep


class FakeResult:
    """What the report reads of a ray.tune Result."""

    def __init__(self, path, config, knn, exploit=(), error=None):
        epochs = list(range(1, len(knn) + 1))
        self.path, self.config, self.error, self.checkpoint = path, config, error, None
        self.metrics_dataframe = pd.DataFrame({"epoch": epochs, "knn_top1": knn,
                                               "exploit": list(exploit) + [""] * (len(knn) - len(exploit))})
        self.metrics = {"epoch": epochs[-1], "knn_top1": knn[-1], "checkpoint_path": f"{path}/ckpt"}


STOP = ("ray.exceptions.RayTaskError(WorkerGroupError): Training failed due to worker errors:\n[Rank 0 Error "
        "Snippet]:\nTraceback (most recent call last):\n  File \"engine.py\", line 1\nsslab.platform.engine."
        "TrainingStopped: training stopped at epoch 2, step 4: loss is not finite (nan). The last good checkpoint "
        "is the latest one under /x (epoch 1 or earlier); lower the learning rate")


@pytest.fixture
def sweep(tmp_path):
    base = {"data.path": "/data/fmnist", "engine.epochs": 3, "engine.workers": 1, "engine.cpus_per_worker": 0.5}
    space = spaces.resolve("simclr", spaces.parse_space(["temperature,recipe.dim=choice:64,128"]), base)
    return Sweep("simclr", base, space, name="sw", storage=str(tmp_path))


def test_failure_reason_is_the_first_sentence_of_the_cause():
    assert failure_reason(STOP) == "training stopped at epoch 2, step 4: loss is not finite (nan)"
    assert failure_reason("Traceback...\n  x\nValueError: bad shape\n") == "ValueError: bad shape"


def test_report_rows_files_and_best_preset(sweep, capsys):
    grid = [
        FakeResult("/s/simclr_a_00000", {"recipe.temperature": 0.1, "recipe.dim": 64}, [0.6, 0.7, 0.8]),
        FakeResult("/s/simclr_a_00001", {"recipe.temperature": 0.3, "recipe.dim": 128}, [0.9]),  # stopped early
        FakeResult("/s/simclr_a_00002", {"recipe.temperature": 0.2, "recipe.dim": 64}, [0.5, 0.4], error=STOP),
        FakeResult("/s/simclr_a_00003", {"recipe.temperature": 0.05, "recipe.dim": 128}, [0.7, 0.75, 0.7],
                   exploit=["", "cloned simclr_a_00000 after epoch 2: recipe.temperature 0.1 -> 0.05"]),
    ]
    out = write_report(sweep, grid)
    rows = {r.trial: r for r in out["rows"]}
    assert [(rows[t].status, rows[t].epochs) for t in sorted(rows)] == [
        ("done", 3), ("stopped", 1), ("failed", 2), ("done", 3)]
    assert rows["simclr_a_00002"].reason == "training stopped at epoch 2, step 4: loss is not finite (nan)"
    assert (rows["simclr_a_00003"].final, rows["simclr_a_00003"].best) == (0.7, 0.75)
    # the best is the best final score among trials that ran every epoch, not the stopped one's early 0.9
    assert out["best"].trial == "simclr_a_00000"

    files = out["files"]
    with open(files["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == sorted(rows)
    assert table[2]["status"] == "failed" and "loss is not finite" in table[2]["reason"]
    assert table[3]["exploits"].startswith("cloned simclr_a_00000 after epoch 2")
    md = open(files["markdown"]).read()
    for trial in rows:
        assert f"| {trial} |" in md
    assert "PBT exploits:" in md and "recipe.temperature 0.1 -> 0.05" in md

    # the preset reproduces the best trial's config, without the data path and the sweep's placement
    tree = yaml.safe_load(open(files["preset"]))
    assert "path" not in tree.get("data", {}) and "workers" not in tree["engine"]
    spec = make_spec("simclr", {**load_preset(files["preset"]), "data.path": "/elsewhere"})
    assert (spec.recipe.temperature, spec.recipe.dim, spec.engine.epochs) == (0.1, 64, 3)

    for key in ("recipe.temperature", "recipe.dim"):
        with Image.open(files[f"png:{key}"]) as img:
            assert img.format == "PNG" and img.size == (640, 420)
    with Image.open(files["png"]) as img:  # the curves, and a column of two knobs beside them
        assert img.format == "PNG" and img.size == (1060, 560)
    # what the figures draw: the histories as reported, the exploit at the epoch the clone started from, the
    # temperature on a log axis and the dim as categories in the space's order
    trials, knobs = plotted(sweep, out["rows"])
    assert [(t.name, t.status, len(t.history), t.exploits) for t in trials] == [
        ("simclr_a_00000", "done", 3, []), ("simclr_a_00001", "stopped", 1, []),
        ("simclr_a_00002", "failed", 2, []), ("simclr_a_00003", "done", 3, [2])]
    assert trials[3].knobs == {"recipe.temperature": 0.05, "recipe.dim": 128}
    assert [(k.key, k.log, k.categories) for k in knobs] == [("recipe.temperature", True, ()),
                                                             ("recipe.dim", False, (64, 128))]
    for trial in rows:  # one HParams session per trial
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(files["hparams"], trial)))

    printed = capsys.readouterr().out
    assert all(trial in printed for trial in rows) and "best: simclr_a_00000" in printed


def test_an_interrupted_sweep_reports_unfinished_trials_and_how_to_resume(sweep, capsys, monkeypatch):
    from sslab.tuning import report

    grid = [FakeResult("/s/simclr_b_00000", {"recipe.temperature": 0.1, "recipe.dim": 64}, [0.6]),
            FakeResult("/s/simclr_b_00001", {"recipe.temperature": 0.2, "recipe.dim": 64}, [0.5])]
    # Tune's saved experiment state: the first trial ended (stopped by ASHA), the second was running
    monkeypatch.setattr(report, "trial_statuses", lambda g: {"simclr_b_00000": "TERMINATED",
                                                              "simclr_b_00001": "RUNNING"})
    out = write_report(sweep, grid)
    assert [r.status for r in out["rows"]] == ["stopped", "unfinished"] and out["unfinished"] == 1
    assert f"sslab tune simclr --name sw --storage {sweep.storage}" in capsys.readouterr().out
