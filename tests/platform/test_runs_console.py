"""What a user sees of runs: `sslab runs` over a finished, a stopped, a failed and a killed run; the console of
`sslab train` without Ray's internals; step-level TensorBoard scalars and HParams; curves.png."""
import glob
import json
import os

import pytest

from sslab.cli import main
from sslab.platform.runs import LOCK_FILE, list_runs, read_history, write_record

TINY = ["--epochs", "2", "--batch-size", "16", "--workers", "1", "engine.steps_per_epoch=3", "engine.knn_k=10",
        "engine.log_every=1", "model.width=4", "engine.collapse_threshold=0", "engine.diagnostics=64"]


def failing_callback():
    """A loop callback raising in epoch 2, as a bug in a recipe would (built in a function: Ray pickles it by
    value)."""
    from sslab.platform.callbacks import Callback

    class Boom(Callback):
        def on_step_start(self, trainer, step):
            if step == 4:
                raise RuntimeError("boom: a bug in step 5")

    return Boom()


@pytest.fixture
def own_ray(_ray_session):
    """No Ray running before the test: `sslab train` starts its own, as on a user's machine (the shared test
    instance forwards workers' output, which a user's run does not). Shut down after."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.ray
def test_runs_console_tensorboard_and_curves(own_ray, tiny_dataset, tmp_path, capfd):
    storage = str(tmp_path / "runs")
    # finished, through the CLI, as a user runs it (stdout and stderr captured at the file-descriptor level)
    assert main(["train", "simclr", "--data", tiny_dataset, "--name", "ok", "--storage", storage] + TINY) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert all(line.startswith("[sslab]") for line in lines), out   # no Ray internals, no worker prefixes
    noise = [s for s in ("RayTrainWorker", "core_worker", "Traceback", "TrainingReport", "DeprecationWarning",
                         "WARNING", "INFO") if s in out + err]
    assert not noise, out + err
    assert sum(" step " in line and "ETA" in line for line in lines) == 6        # 3 steps x 2 epochs, not a TTY
    assert sum(" done: " in line for line in lines) == 2 and "align" in out and "rank" in out, out
    assert len(lines) <= 20
    run = os.path.join(storage, "ok")
    assert os.path.getsize(os.path.join(run, "ray.log")) > 0                    # Ray's messages went here

    # the run directory: per-epoch history, a picture of it, TensorBoard per step and HParams
    history = read_history(run)
    assert [m["epoch"] for m in history] == [1, 2]
    assert {"alignment", "uniformity", "effective_rank", "knn_top1"} <= set(history[-1])
    from PIL import Image

    assert Image.open(os.path.join(run, "curves.png")).size[0] > 300
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4, 5, 6]
    assert {"step/lr", "step/images_per_s", "effective_rank", "final/knn_top1"} <= set(events.Tags()["scalars"])
    plugin = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugin

    # stopped by a guard: SGD at lr 1e6 blows the weights up (the divergence guard)
    assert main(["train", "simclr", "--data", tiny_dataset, "--name", "diverged", "--storage", storage,
                 "engine.optimizer=sgd", "engine.base_lr=1e6"] + TINY) == 1
    err = capfd.readouterr().err                # the guard's one line, not the worker traceback Ray wraps it in
    assert "[sslab] training stopped at epoch 1, step 1: weights diverged" in err and "Traceback" not in err
    # failed: an exception inside the loop
    from sslab.platform.launch import train
    from sslab.platform.spec import make_spec

    spec = make_spec("simclr", {"data.path": tiny_dataset, "engine.epochs": 2, "engine.batch_size": 16,
                                "engine.workers": 1, "engine.steps_per_epoch": 3, "engine.max_failures": 0,
                                "model.width": 4, "engine.knn_every": 0, "engine.diagnostics": 0})
    with pytest.raises(Exception, match="boom"):
        train(spec, name="broken", storage=storage, worker_callbacks=[failing_callback()])
    # killed: its record says running but no process holds its lock
    write_record(os.path.join(storage, "killed"), recipe="byol", epochs=5, status="running", started=1.0)
    with open(os.path.join(storage, "killed", LOCK_FILE), "w") as f:
        json.dump({"pid": 2 ** 22 + 12345, "host": os.uname().nodename, "since": 1.0}, f)
    capfd.readouterr()

    runs = {r["name"]: r for r in list_runs(storage)}
    assert runs["ok"]["status"] == "finished" and runs["ok"]["epochs"] == 2 and runs["ok"]["planned"] == 2
    assert runs["ok"]["best_knn"] is not None and runs["ok"]["wall_s"] > 0
    assert runs["diverged"]["status"] == "stopped" and "diverged" in runs["diverged"]["reason"]
    assert runs["broken"]["status"] == "failed" and runs["broken"]["epochs"] == 1
    assert runs["broken"]["reason"] == "RuntimeError: boom: a bug in step 5"
    assert runs["killed"]["status"] == "interrupted"
    assert main(["runs", storage]) == 0
    table = capfd.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "recipe", "status", "epochs"] and len(table) == 5
    row = next(line for line in table if line.startswith("diverged"))
    assert "stopped (weights diverged" in row and "simclr" in row
    assert len(glob.glob(os.path.join(storage, "*", "run.json"))) == 4
