"""The benchmark's bare loop and the engine share one training step: the same seed and batches give the same
losses through Ray Train and in this process."""
import os

import pytest
import torch

from sslab.bench.train import bare_steps
from sslab.platform.launch import train
from sslab.platform.spec import make_spec


def record_steps(path: str):
    """A loop callback saving every step's batch (as the stream gave it) and loss; defined inside a function so Ray
    pickles the class by value into its workers."""
    from sslab.platform.callbacks import Callback

    class Record(Callback):
        def on_step_end(self, trainer, batch, out):
            torch.save({"batch": {k: v.clone() for k, v in batch.items()}, "loss": out.loss.item()},
                       os.path.join(path, f"step{trainer.step:03d}.pt"))

    return Record()


@pytest.mark.ray
def test_engine_and_bare_loop_give_the_same_losses(local_ray, tiny_dataset, tmp_path, one_torch_thread):
    spec = make_spec("simclr", {"data.path": tiny_dataset, "engine.batch_size": 16, "engine.workers": 1,
                                "engine.cpus_per_worker": 1, "engine.epochs": 1, "engine.steps_per_epoch": 3,
                                "engine.knn_every": 0, "engine.clip_grad": 1.0, "model.width": 4,
                                "recipe.hidden": 16, "recipe.dim": 8})
    steps = tmp_path / "steps"
    steps.mkdir()
    result = train(spec, name="same-step", storage=str(tmp_path / "runs"), worker_callbacks=[record_steps(str(steps))])
    assert result.error is None
    saved = [torch.load(p, weights_only=True) for p in sorted(steps.glob("step*.pt"))]
    assert len(saved) == 3
    engine = [s["loss"] for s in saved]
    bare, _ = bare_steps(spec, [s["batch"] for s in saved], 3)
    assert bare == pytest.approx(engine, rel=1e-6, abs=1e-7)
    assert len(set(engine)) == 3  # the weights moved between steps: three different losses
