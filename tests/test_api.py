"""The Python API and a raw folder end to end: `sslab.train` on a folder of images (prepared into the cache once,
reused by the CLI's second run, a changed file makes a new copy), `sslab.load_encoder` with its preprocessing, and
`sslab.embed` equal to the encoder run in this process."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

import sslab
from conftest import make_image_folder

TINY = {"epochs": 1, "batch_size": 16, "workers": 1, "engine.steps_per_epoch": 2, "engine.knn_k": 10,
        "model__width": 4, "engine.collapse_threshold": 0, "engine.diagnostics": 32}


@pytest.mark.ray
def test_train_a_folder_load_its_encoder_and_embed(local_ray, tmp_path, capfd):
    folder = make_image_folder(str(tmp_path / "photos"), n_per_class=30, size=(20, 14), mode="L")
    cache = str(tmp_path / "cache")
    run = sslab.train("simclr", data=folder, prepared_dir=cache, name="api", storage=str(tmp_path / "runs"), **TINY)
    assert run.ok and run.checkpoint and [m["epoch"] for m in run.history] == [1]
    assert 0 <= run.metrics["knn_top1"] <= 1 and os.path.isdir(run.run_dir)
    out = capfd.readouterr().out
    assert "[sslab] preparing" in out and "(first use)" in out
    assert "inferred 16 px" in out and "1 channel" in out     # median shorter side 14 -> 16; grey images

    # the CLI on the same folder reuses the prepared copy
    from sslab.cli import main

    assert main(["train", "simclr", "--data", folder, "--prepared-dir", cache, "--name", "cli", "--storage",
                 str(tmp_path / "runs"), "--epochs", "1", "--batch-size", "16", "--workers", "1",
                 "engine.steps_per_epoch=1", "model.width=4", "engine.knn_every=0", "engine.diagnostics=0"]) == 0
    out = capfd.readouterr().out
    assert "[sslab] using prepared data" in out and "[sslab] preparing" not in out
    entries = os.listdir(cache)
    # a changed file: a new prepared copy next to the old one
    first = sorted(p for p in (tmp_path / "photos").rglob("*.png"))[0]
    os.utime(first, (1, 1))
    from sslab.datasets.cache import resolve_data

    changed = resolve_data(folder, cache, log=lambda s: None)
    assert os.path.basename(changed) not in entries and set(entries) <= set(os.listdir(cache))

    # the encoder and its preprocessing: files in, features out, as the prepared images give them
    encoder = sslab.load_encoder(run.run_dir)
    from sslab.datasets.shards import load_split
    from sslab.platform.checkpoint import load_trained

    data = load_trained(run.run_dir).spec.data.path                  # the prepared copy the run trained on
    assert data.startswith(cache)

    images, labels, index = load_split(data, "test")
    by_file = encoder.embed(images)                                   # uint8 [n, C, H, W], as stored
    assert by_file.shape == (len(images), 4 * 8)
    with torch.no_grad():
        direct = encoder(encoder.preprocess(torch.from_numpy(images)))
    torch.testing.assert_close(by_file, direct)
    pngs = sorted(str(p) for p in (tmp_path / "photos").rglob("*.png"))[:3]
    assert encoder.embed(pngs).shape == (3, 32)

    # sslab.embed through Ray Data: one row per test image, the same features
    path = sslab.embed(run.run_dir, data=folder, out=str(tmp_path / "emb.parquet"), prepared_dir=cache,
                       split="test")
    table = pd.read_parquet(path).sort_values("id")
    assert list(table["id"]) == list(index) and list(table["label"]) == list(labels)
    np.testing.assert_allclose(np.stack(table["embedding"].to_numpy()), by_file.numpy(), rtol=1e-4, atol=1e-5)
