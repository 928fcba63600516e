"""The checkpoint layout's owner: a checkpoint from the previous engine still loads, and loading never runs code."""
import os

import pytest
import torch

from sslab.platform.checkpoint import INDEX_FILE, STATE_FILE, find_checkpoint, load_state, load_trained
from tests.platform.test_eval import make_checkpoint


def test_a_checkpoint_written_before_the_loop_redesign_still_loads(tmp_path, tiny_dataset):
    """The engine before platform/loop.py wrote the same state with three engine keys since retired (a test-only
    fault knob and PBT's segment knobs, now arguments of launch.train), and no checkpoint.json."""
    ckpt = str(tmp_path / "run" / "checkpoint_2026-01-01_10-00-00.000000")
    recipe = make_checkpoint(ckpt, tiny_dataset)
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
    state["spec"]["engine"] |= {"fault_step": 0, "stop_after_epoch": 0, "resume_from": ""}
    torch.save(state, os.path.join(ckpt, STATE_FILE))
    os.remove(os.path.join(ckpt, INDEX_FILE))
    trained = load_trained(str(tmp_path / "run"))
    assert trained.path == ckpt and trained.epoch == 1
    for k, v in recipe.state_dict().items():
        assert torch.equal(trained.recipe.state_dict()[k], v), k


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a planted pickle does: run a command when loaded
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"recipe": {}, "payload": Payload(marker)}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError) as refused:
        load_state(str(tmp_path))
    assert str(refused.value) == (f"{tmp_path / STATE_FILE}: refused: it holds a posix.system besides tensors and "
                                  f"plain data, and loading that could run code from the file")
    assert "\n" not in str(refused.value) and not marker.exists()
    (tmp_path / STATE_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable sslab checkpoint"):
        load_state(str(tmp_path))


def test_the_newest_checkpoint_that_verifies_is_used(tmp_path, tiny_dataset, capsys):
    """A truncated newest checkpoint, and a half-written folder after it (a full disk), are skipped by name."""
    run = tmp_path / "run"
    good = str(run / "checkpoint_2026-01-01_10-00-00.000000")
    make_checkpoint(good, tiny_dataset)
    cut = str(run / "checkpoint_2026-01-01_10-05-00.000000")
    make_checkpoint(cut, tiny_dataset, epoch=1)
    with open(os.path.join(cut, STATE_FILE), "r+b") as f:
        f.truncate(1000)
    (run / "checkpoint_2026-01-01_10-10-00.000000").mkdir()
    assert find_checkpoint(str(run)) == good
    out = capsys.readouterr().out
    assert f"skipped checkpoint {cut} ({STATE_FILE} has 1000 bytes, {INDEX_FILE} says" in out
    assert "checkpoint_2026-01-01_10-10-00.000000 (no state.pt)" in out
    with pytest.raises(ValueError, match=f"{cut}: not a usable checkpoint"):
        find_checkpoint(cut)                                   # asked for by name: an error, not a substitute
    with open(os.path.join(good, STATE_FILE), "r+b") as f:     # same size, other bytes
        f.seek(100)
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="no usable checkpoint: .*sha256 differs"):
        find_checkpoint(str(run))
