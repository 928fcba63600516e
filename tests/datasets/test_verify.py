"""Shards checked against their manifest before any training: each fault names the file (and row)."""
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_image_folder
from sslab.datasets.shards import SCHEMA, prepare, read_manifest
from sslab.datasets.sources import image_folder


@pytest.fixture
def data(tmp_path):
    src = make_image_folder(str(tmp_path / "imgs"), n_per_class=10, size=(16, 16))
    out = tmp_path / "data"
    prepare(image_folder(src, size=16, channels=1, test_fraction=0.0), out, shard_rows=8, progress=None)
    read_manifest(out).verify()                                    # the fresh dataset passes
    return out


def edit_manifest(out, **fields):
    m = json.loads((out / "manifest.json").read_text())
    m.update(fields)
    (out / "manifest.json").write_text(json.dumps(m))


def test_a_changed_shard_fails_its_checksum(data):
    m = json.loads((data / "manifest.json").read_text())
    m["splits"]["train"]["files"][1]["sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"train-00001.parquet: sha256 differs from the manifest"):
        read_manifest(data).verify()
    read_manifest(data).verify(checksums=False)                    # data.verify=false trains on it anyway


def test_random_bytes_instead_of_a_shard(data):
    (data / "train-00000.parquet").write_bytes(b"\x00" * 5000)
    with pytest.raises(ValueError, match=r"train-00000.parquet: not a readable Parquet file"):
        read_manifest(data).verify(checksums=False)


def test_declared_channels_or_size_that_the_images_do_not_have(data, tmp_path):
    grey = tmp_path / "grey"
    shutil.copytree(data, grey)
    edit_manifest(grey, channels=3, mean=[0.5] * 3, std=[0.2] * 3)
    with pytest.raises(ValueError, match=r"train-00000.parquet: row with index 0 is a 16x16 L image; .* declares "
                                         r"16x16 RGB"):
        read_manifest(grey).verify()
    edit_manifest(data, image_size=[32, 32])
    with pytest.raises(ValueError, match=r"is a 16x16 L image; .* declares 32x32 L"):
        read_manifest(data).verify()


def test_a_garbage_image_row_and_a_foreign_schema(data):
    path = data / "train-00000.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = b"\x89PNG but not really"
    pq.write_table(table.set_column(0, pa.field("image", pa.binary()), pa.array(images, pa.binary())), path)
    with pytest.raises(ValueError, match=r"train-00000.parquet: row with index 1 is not a readable image"):
        read_manifest(data).verify(checksums=False)
    pq.write_table(table.rename_columns(["img", "label", "index"]), path)
    with pytest.raises(ValueError, match=r"columns \['img', 'label', 'index'\] are not sslab's"):
        read_manifest(data).verify(checksums=False)
    assert SCHEMA.names == ["image", "label", "index"]


def test_train_refuses_bad_data_before_ray(data, tmp_path, capsys, monkeypatch):
    import sslab.platform.launch as launch
    from sslab.cli import main

    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: pytest.fail("Ray started for bad data"))
    (data / "train-00001.parquet").write_bytes(b"truncated")
    assert main(["train", "simclr", "--data", str(data), "--batch-size", "4", "--storage", str(tmp_path)]) == 2
    assert "train-00001.parquet: not a readable Parquet file" in capsys.readouterr().err
