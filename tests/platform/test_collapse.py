"""The collapse monitor: the score itself, and a deliberately collapsing run that the engine stops, saying which
metric, at which step, and which checkpoint is the last good one."""
import os
import re

import pytest
import torch

from sslab.evaluation.diagnostics import collapse_score
from sslab.platform.checkpoint import STATE_FILE


def test_collapse_score_is_one_when_spread_and_zero_when_collapsed():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 64, generator=g)
    assert collapse_score(spread) == pytest.approx(1.0, abs=0.05)
    assert collapse_score(3.0 * spread + 0.0) == pytest.approx(collapse_score(spread), rel=1e-5)  # scale-free
    one_point = torch.randn(1, 64, generator=g).expand(512, 64)
    assert collapse_score(one_point) == pytest.approx(0.0, abs=1e-6)
    # most of the way: a shared direction plus a little spread
    assert collapse_score(one_point + 0.01 * spread) < 0.05


@pytest.mark.ray
def test_collapsing_run_is_stopped_naming_metric_step_and_last_good_checkpoint(local_ray, tiny_dataset, tmp_path):
    """SimSiam without its stop-gradient (Chen & He 2021, §4.1) and without BN on the projector output (table 4,
    variant b) reaches the degenerate minimum of the loss: one update at lr 5 takes the score from ~0.8 to ~0.2,
    then ~0.1 (measured on this data). One step per epoch: epoch 1 is scored on the initial network (healthy,
    checkpointed), epoch 2 after the first update."""
    import ray.train

    from sslab.platform.launch import train
    from sslab.platform.spec import make_spec

    spec = make_spec("simsiam", {
        "data.path": tiny_dataset, "engine.batch_size": 16, "engine.workers": 1, "engine.cpus_per_worker": 0.5,
        "engine.epochs": 3, "engine.steps_per_epoch": 1, "engine.knn_every": 0, "engine.base_lr": 80.0,
        "engine.collapse_threshold": 0.4, "model.width": 4, "recipe.dim": 32, "recipe.pred_hidden": 8,
        "recipe.stop_gradient": False, "recipe.output_bn": False})
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        train(spec, name="collapse", storage=str(tmp_path))
    message = str(failed.value)  # what `sslab train` prints
    found = re.search(r"training stopped at epoch (\d+), step (\d+): representation collapsed: collapse_score "
                      r"\(([\d.]+) < engine.collapse_threshold 0.4\)\. Last good checkpoint: (\S+) "
                      r"\(epoch (\d+), step (\d+)\)", message)
    assert found, message
    epoch, step, score, path, good_epoch, good_step = found.groups()
    assert float(score) < 0.4 and int(epoch) >= 2
    assert (int(good_epoch), int(good_step)) == (int(epoch) - 1, int(step) - 1)  # the epoch before, one step each
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
    assert (state["epoch"] + 1, state["global_step"]) == (int(good_epoch), int(good_step))
    run_dir = os.path.join(tmp_path, "collapse")
    # the collapsed state was never checkpointed: the newest checkpoint is the last good one
    saved = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, d))]
    newest = max(saved)  # named by time
    assert os.path.samefile(os.path.join(run_dir, newest), path)
