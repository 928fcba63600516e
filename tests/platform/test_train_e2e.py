"""End to end through a real local Ray: 2 Train workers, real data stream, checkpoints, resume."""
import os

import pytest
import torch

from sslab.platform.checkpoint import STATE_FILE
from sslab.platform.launch import train
from sslab.platform.spec import make_spec

pytestmark = pytest.mark.ray

FAST = {"engine.batch_size": 16, "engine.workers": 2, "engine.cpus_per_worker": 0.5, "engine.knn_k": 10,
        "engine.log_every": 2, "model.width": 4, "recipe.hidden": 16, "recipe.dim": 8, "data.batch_rows": 32}


def _spec(data, **extra):
    return make_spec("simclr", {"data.path": data, **FAST, **extra})


@pytest.mark.parametrize("augment", ["pipeline", "worker"])
def test_train_two_workers_checkpoint_and_resume(local_ray, tiny_dataset, tmp_path, augment):
    storage = str(tmp_path / "runs")
    first = train(_spec(tiny_dataset, **{"engine.epochs": 1, "data.augment": augment}), name="e2e", storage=storage)
    assert first.error is None
    m = first.metrics
    assert m["epoch"] == 1 and m["step"] == 96 // 16 and torch.isfinite(torch.tensor(m["loss"]))
    assert 0.0 <= m["knn_top1"] <= 1.0 and 0.0 <= m["knn_top1_pixels"] <= 1.0
    state = torch.load(os.path.join(first.checkpoint.path, STATE_FILE), weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 6
    assert os.listdir(os.path.join(storage, "e2e", "tensorboard")), "rank 0 writes TensorBoard events"

    # the same name with more epochs resumes from the checkpoint instead of starting again
    second = train(_spec(tiny_dataset, **{"engine.epochs": 2, "data.augment": augment}), name="e2e", storage=storage)
    assert second.error is None
    assert second.metrics["epoch"] == 2 and second.metrics["step"] == 12  # 6 steps more, not 12
    resumed = torch.load(os.path.join(second.checkpoint.path, STATE_FILE), weights_only=True)
    assert resumed["epoch"] == 1
    # training moved the weights on from the first checkpoint
    w0 = state["recipe"]["backbone.body.0.weight"]
    assert not torch.equal(w0, resumed["recipe"]["backbone.body.0.weight"])


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(local_ray, tiny_dataset, tmp_path, capsys):
    """A crash (or a full disk) while the newest checkpoint was written: the same command resumes from the newest
    one that verifies, saying which it skipped."""
    storage = str(tmp_path / "runs")
    first = train(_spec(tiny_dataset, **{"engine.epochs": 2, "engine.knn_every": 0}), name="cut", storage=storage)
    assert first.error is None and first.metrics["step"] == 12
    state = os.path.join(first.checkpoint.path, STATE_FILE)
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    again = train(_spec(tiny_dataset, **{"engine.epochs": 3, "engine.knn_every": 0}), name="cut", storage=storage)
    assert again.error is None
    assert again.metrics["epoch"] == 3 and again.metrics["step"] == 18   # epochs 2 and 3 from epoch 1's state
    assert f"skipped checkpoint {first.checkpoint.path}" in capsys.readouterr().out


def corrupt_row(data: str, out, index: int) -> None:
    """A copy of the prepared dataset `data` in `out` whose training row `index` holds bytes that are no image
    (its manifest's checksum updated, as if the file had been written so)."""
    import hashlib
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(data, out)
    m = json.loads((out / "manifest.json").read_text())
    entry = m["splits"]["train"]["files"][0]
    path = out / entry["path"]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[table.column("index").to_pylist().index(index)] = b"\x89PNG\r\n\x1a\n but cut short"
    pq.write_table(table.set_column(0, pa.field("image", pa.binary()), pa.array(images, pa.binary())), path)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))


def test_an_unreadable_image_is_skipped_counted_and_named(local_ray, tiny_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    corrupt_row(tiny_dataset, data, index=10)        # not among the rows checked before the run
    # views made in the pipeline (the default makes them in the worker): the same skip-and-count either way
    result = train(_spec(str(data), **{"engine.epochs": 1, "engine.knn_every": 0, "data.max_bad_fraction": 0.05,
                                       "data.augment": "pipeline"}),
                   name="bad-row", storage=str(tmp_path / "runs"))
    assert result.error is None and result.metrics["bad_rows"] == 1
    assert result.metrics["step"] == 96 // 16            # 96 of the 97 rows left: still 6 whole batches
    out = capsys.readouterr().out
    assert "[sslab] skipped 1 unreadable training image(s)" in out and "train-00000.parquet index 10: " in out
