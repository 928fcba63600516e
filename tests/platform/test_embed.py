"""`sslab embed`: one row per image (id, label, split, embedding) equal to in-process feature extraction; the actor
pool's size; an existing output is kept unless --force."""
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from sslab.config import ConfigError
from sslab.platform.embed import Encode, check_out, decode, embed, plan_replicas
from tests.platform.test_eval import make_checkpoint


def test_one_replica_per_gpu_else_one_per_cpu_but_one():
    assert plan_replicas("auto", {"CPU": 16.0, "GPU": 4.0}) == ("cuda", 4, {"num_gpus": 1, "num_cpus": 1})
    assert plan_replicas("auto", {"CPU": 16.0}) == ("cpu", 15, {"num_cpus": 1})
    assert plan_replicas("cpu", {"CPU": 16.0, "GPU": 4.0}) == ("cpu", 15, {"num_cpus": 1})
    assert plan_replicas("auto", {"CPU": 1.0})[1] == 1
    assert plan_replicas("cuda", {"CPU": 16.0, "GPU": 4.0}, replicas=2)[1] == 2
    with pytest.raises(ConfigError, match="no GPUs"):
        plan_replicas("cuda", {"CPU": 16.0})


def test_an_existing_output_is_refused_before_anything_loads(tmp_path):
    out = tmp_path / "emb.parquet"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=re.escape(str(out)) + ".*--force"):
        embed(str(tmp_path / "no-such-run"), out=str(out))
    assert out.read_bytes() == b"mine"
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path)) + " is a directory"):
        check_out(str(tmp_path), force=True)


def _unlabelled_dataset(path) -> str:
    """Ten unlabelled 20x20 grey images in a train split."""
    from sslab.datasets import shards
    from sslab.datasets.sources import Record

    rng = np.random.default_rng(0)
    records = [Record("train", rng.integers(0, 256, (20, 20, 1), dtype=np.uint8), None, f"img{i}") for i in range(10)]
    shards.prepare(records, path, name="unlabelled", progress=None)
    return str(path)


def _check_rows(df, data_dir, split, trained):
    """`df`'s rows of `split`: every index once, the shards' labels, and the embeddings `extract` gives."""
    from sslab.datasets.shards import load_split
    from sslab.evaluation.knn import extract, make_prepare

    images, labels, index = load_split(data_dir, split)
    rows = df[df.split == split].sort_values("id")
    assert rows.id.tolist() == index.tolist() == list(range(len(images)))
    assert rows.label.tolist() == labels.tolist()
    want = extract(trained.encoder, torch.from_numpy(images), make_prepare(trained.mean, trained.std,
                                                                           trained.image_size))
    got = np.stack(rows.embedding.to_numpy())
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_decoded_rows_keep_their_ids_and_unknown_labels_become_minus_one():
    from sslab.datasets.shards import encode_png

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    shard = pa.table({"image": [encode_png(x) for x in images], "label": pa.array([1, None, 0], pa.int64()),
                      "index": [5, 6, 7]})
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    table = Encode(encoder, (0.5,), (0.25,), 8, "cpu", threads=0)(decode(shard, "test", 1, (8, 8)))
    assert table.column_names == ["id", "label", "split", "embedding"]
    assert table.column("id").to_pylist() == [5, 6, 7]
    assert table.column("label").to_pylist() == [1, -1, 0] and table.column("split").to_pylist() == ["test"] * 3
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 5)


@pytest.mark.ray
def test_embed_end_to_end(local_ray, tiny_dataset, tmp_path, capsys):
    from sslab.cli import main
    from sslab.datasets.shards import read_manifest
    from sslab.platform.checkpoint import load_trained

    # a run directory holding one checkpoint (weights as initialised) of a run on 12 px crops
    make_checkpoint(str(tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000"), tiny_dataset,
                    **{"data.crop_size": 12})
    run = str(tmp_path / "run")
    trained = load_trained(run)
    assert trained.image_size == 12                # the data's 16 px images are resized, as extraction does

    out = tmp_path / "out" / "emb.parquet"
    assert main(["embed", run, "--out", str(out), "--batch-size", "16", "--device", "cpu", "--replicas", "2"]) == 0
    df = pd.read_parquet(out)
    m = read_manifest(tiny_dataset)
    assert list(df.columns) == ["id", "label", "split", "embedding"]
    assert len(df) == sum(m.count(s) for s in m.split_names) and set(df.split) == set(m.split_names)
    for split in m.split_names:
        _check_rows(df, tiny_dataset, split, trained)

    capsys.readouterr()
    written = out.read_bytes()
    assert main(["embed", run, "--out", str(out)]) == 2
    assert f"{out} already exists" in capsys.readouterr().err and out.read_bytes() == written

    other = _unlabelled_dataset(tmp_path / "unlabelled")      # 20 px, no labels: resized, label -1
    assert embed(run, other, str(out), split="train", batch_size=4, device="cpu", replicas=1, force=True) == str(out)
    df = pd.read_parquet(out)
    assert set(df.split) == {"train"} and set(df.label) == {-1}
    _check_rows(df, other, "train", load_trained(run, other))
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.parquet"]       # no temporary file left
