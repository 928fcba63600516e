"""What `sslab train` refuses before Ray starts: a name that is a path, a run already in use, and resuming a run
with another recipe or a model its checkpoint does not fit."""
import json
import os
import subprocess
import time

import pytest

from sslab.cli import main
from sslab.platform.runs import LOCK_FILE, run_lock
from tests.platform.test_eval import make_checkpoint


@pytest.fixture
def no_ray(monkeypatch):
    import sslab.platform.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a run that should have been refused")
    monkeypatch.setattr(launch, "init_ray", refuse)


def train(data, storage, name, *extra):
    return main(["train", "simclr", "--data", data, "--storage", str(storage), "--name", name, "--batch-size", "16",
                 "model.width=4", "recipe.hidden=16", "recipe.dim=8", *extra])


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "x..y", ""])
def test_a_run_name_is_one_folder(name, tiny_dataset, tmp_path, capsys, no_ray):
    assert train(tiny_dataset, tmp_path / "runs", name) == 2
    assert "a run name is one folder name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


def test_a_run_in_use_is_refused_and_a_stale_lock_taken_over(tiny_dataset, tmp_path, capsys, no_ray):
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    lock = run / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))
    assert train(tiny_dataset, tmp_path / "runs", "busy") == 2
    assert f"is in use by pid {os.getpid()}" in capsys.readouterr().err
    gone = subprocess.Popen(["true"])
    gone.wait()
    zombie = subprocess.Popen(["true"])          # dead, never collected: its pid still answers a signal 0
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    reused = os.getpid()                           # a live pid that started after the lock was written
    for pid, since in ((gone.pid, time.time()), (zombie.pid, time.time()), (reused, time.time() - 10 ** 6)):
        lock.write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "since": since}))
        with run_lock(str(run)):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"its owner, pid {pid} on this host, is gone" in capsys.readouterr().out and not lock.exists()
    zombie.wait()


def test_resuming_with_another_recipe_or_model_is_refused(tiny_dataset, tmp_path, capsys, no_ray):
    make_checkpoint(str(tmp_path / "runs" / "r" / "checkpoint_2026-01-01_10-00-00.000000"), tiny_dataset)
    assert main(["train", "simsiam", "--data", tiny_dataset, "--storage", str(tmp_path / "runs"), "--name", "r",
                 "--batch-size", "16"]) == 2
    assert "holds recipe simclr" in capsys.readouterr().err
    assert train(tiny_dataset, tmp_path / "runs", "r", "model.width=8") == 2
    err = capsys.readouterr().err
    assert "does not fit this command's simclr (model.width 4 -> 8)" in err and "another --name" in err
    assert not (tmp_path / "runs" / "r" / LOCK_FILE).exists()
