"""The checkpoint layout's owner: a checkpoint from the previous engine still loads, and loading never runs code."""
import os

import pytest
import torch

from sslab.platform.checkpoint import STATE_FILE, load_state, load_trained
from tests.platform.test_eval import make_checkpoint


def test_a_checkpoint_written_before_the_loop_redesign_still_loads(tmp_path, tiny_dataset):
    """The engine before platform/loop.py wrote the same state with three engine keys since retired (a test-only
    fault knob and PBT's segment knobs, now arguments of launch.train)."""
    ckpt = str(tmp_path / "run" / "checkpoint_2026-01-01_10-00-00.000000")
    recipe = make_checkpoint(ckpt, tiny_dataset)
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
    state["spec"]["engine"] |= {"fault_step": 0, "stop_after_epoch": 0, "resume_from": ""}
    torch.save(state, os.path.join(ckpt, STATE_FILE))
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
    assert str(refused.value).startswith(f"{tmp_path / STATE_FILE}: not a readable sslab checkpoint")
    assert "\n" not in str(refused.value) and not marker.exists()
    (tmp_path / STATE_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable sslab checkpoint"):
        load_state(str(tmp_path))
