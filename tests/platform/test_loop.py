"""The loop in this process: Trainer + LocalContext + the standard callbacks, no Ray."""
import math

import pytest
import torch

from sslab.datasets.pipeline import local_batches
from sslab.datasets.shards import read_manifest
from sslab.platform.callbacks import Callback, default_callbacks
from sslab.platform.checkpoint import checkpoints, load_state
from sslab.platform.context import LocalContext
from sslab.platform.loop import Trainer, TrainingStopped
from sslab.platform.spec import make_spec
from sslab.recipes import registry

TINY = {"engine.batch_size": 16, "engine.steps_per_epoch": 2, "engine.knn_k": 10, "engine.log_every": 1,
        "model.width": 4, "recipe.hidden": 16, "recipe.dim": 8}


def local_run(data, run_dir, callbacks=None, **overrides):
    spec = make_spec("simclr", {"data.path": data, **TINY, **overrides})
    m = read_manifest(data)
    viewset = registry.get("simclr").views(spec.recipe, spec.data, m.image_size[0])
    ctx = LocalContext(local_batches(spec.data, m, viewset), run_dir=str(run_dir), keep=spec.engine.checkpoint_keep)
    Trainer(spec, ctx, default_callbacks() if callbacks is None else callbacks).run()
    return ctx


def test_trainer_runs_checkpoints_and_resumes_in_process(tiny_dataset, tmp_path, one_torch_thread, capsys):
    run = tmp_path / "run"
    ctx = local_run(tiny_dataset, run, **{"engine.epochs": 2})
    assert [(r["epoch"], r["step"]) for r in ctx.reports] == [(1, 2), (2, 4)]
    for r in ctx.reports:   # the loop's metrics, then the monitors' (kNN, collapse)
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1
        assert 0 <= r["knn_top1"] <= 1 and 0 <= r["knn_top1_pixels"] <= 1 and r["collapse_score"] > 0
    out = capsys.readouterr().out
    assert "[sslab] epoch 1/2 step 1/2 loss" in out and "[sslab] epoch 2/2 done: loss" in out
    saved = checkpoints(str(run))
    assert len(saved) == 2 and load_state(saved[-1])["global_step"] == 4

    # the same run directory with more epochs resumes from the newest checkpoint: 2 steps more, not 6
    again = local_run(tiny_dataset, run, **{"engine.epochs": 3})
    assert [(r["epoch"], r["step"]) for r in again.reports] == [(3, 6)]
    assert "resumed from checkpoint after epoch 2 (step 4)" in capsys.readouterr().out
    assert len(checkpoints(str(run))) == 2  # engine.checkpoint_keep


class StopAtEpochTwo(Callback):
    """A guard that asks the loop to stop at the end of epoch 2."""

    def on_epoch_end(self, trainer, metrics):
        if metrics["epoch"] == 2:
            trainer.request_stop("test guard", "epoch 2")


def test_a_stopped_epoch_is_reported_not_checkpointed(tiny_dataset, tmp_path, one_torch_thread):
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        local_run(tiny_dataset, run, [StopAtEpochTwo()], **{"engine.epochs": 3, "engine.knn_every": 0})
    saved = checkpoints(str(run))
    assert len(saved) == 1 and load_state(saved[0])["global_step"] == 2
    assert str(stopped.value).startswith(f"training stopped at epoch 2, step 4: test guard (epoch 2). Last good "
                                         f"checkpoint: {saved[0]} (epoch 1, step 2)")


def test_a_non_finite_loss_stops_before_the_update(tiny_dataset, tmp_path, one_torch_thread):
    class PoisonWeights(Callback):       # a diverged network: the next loss is NaN
        def on_step_start(self, trainer, step):
            if step == 3:
                with torch.no_grad():
                    next(trainer.recipe.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingStopped, match=r"at epoch 2, step 3: loss is not finite \(nan\)\. Last good "
                                              r"checkpoint: .*checkpoint_.* \(epoch 1, step 2\)"):
        local_run(tiny_dataset, tmp_path / "run", [PoisonWeights()], **{"engine.epochs": 2, "engine.knn_every": 0})


def test_exploding_weights_stop_the_run(tiny_dataset, tmp_path, one_torch_thread):
    """SGD at lr 1e6: L2-normalised outputs keep the loss finite and the collapse score normal while the weights
    blow up; the divergence guard stops the run at the first step past engine.divergence_factor."""
    with pytest.raises(TrainingStopped, match=r"at epoch 1, step 1: weights diverged: their L2 norm \(\S+ > "
                                              r"engine.divergence_factor 1000 x \S+ at the start\)\. No checkpoint"):
        local_run(tiny_dataset, tmp_path / "run", **{"engine.epochs": 2, "engine.optimizer": "sgd",
                                                     "engine.base_lr": 1e6, "engine.knn_every": 0})
    assert not (tmp_path / "run").exists()


def test_too_many_unreadable_rows_stop_the_run(tiny_dataset, tmp_path, one_torch_thread):
    class SkippingContext(LocalContext):      # as if the stream had skipped 2 rows that would not decode
        def bad_rows(self):
            return 2

    spec = make_spec("simclr", {"data.path": tiny_dataset, **TINY, "engine.epochs": 2, "engine.knn_every": 0})
    m = read_manifest(tiny_dataset)
    ctx = SkippingContext(local_batches(spec.data, m, registry.get("simclr").views(spec.recipe, spec.data, 16)),
                          run_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingStopped, match=r"at epoch 1, step 2: unreadable training images \(2 of 97 rows > "
                                              r"data.max_bad_fraction 0.01;"):
        Trainer(spec, ctx, default_callbacks()).run()
    assert ctx.reports[0]["bad_rows"] == 2 and not checkpoints(str(tmp_path / "run"))


@pytest.mark.parametrize("recipe", ["simclr", "byol", "dino"])   # two views, an asymmetric pair, multi-crop
def test_views_made_in_the_worker_equal_the_pipelines(tiny_dataset, one_torch_thread, recipe):
    # data.augment=worker: the stream holds decoded images and the loop makes the views; pipeline: the stream holds
    # views made by the pipeline's function. Same run seed, same epoch: the same uint8 views of the same images.
    tiny = {k: v for k, v in TINY.items() if not k.startswith("recipe.")}
    spec = make_spec(recipe, {"data.path": tiny_dataset, **tiny, "engine.seed": 3})
    m = read_manifest(tiny_dataset)
    viewset = registry.get(recipe).views(spec.recipe, spec.data, m.image_size[0])
    shown = {}
    for mode, vs in (("pipeline", viewset), ("worker", None)):
        trainer = Trainer(spec, LocalContext(local_batches(spec.data, m, vs, seed=3)))
        trainer.setup()
        views, batch, raw = next(iter(trainer.stream(epoch=0)))
        assert len(views) == len(viewset.columns) and views[0].dtype == torch.float32
        shown[mode] = (raw, batch["index"])
    (pipe, i1), (work, i2) = shown["pipeline"], shown["worker"]
    assert torch.equal(i1, i2)
    for col in viewset.columns:
        assert work[col].dtype == torch.uint8 and torch.equal(work[col], pipe[col]), col
