"""The Ray Data stream: decoded, augmented uint8 views with the right shapes, two different views per image."""
import numpy as np
import pytest

from sslab.datasets.pipeline import DataConfig, MakeViews, train_dataset
from sslab.datasets.shards import load_split, read_manifest
from sslab.datasets.views import multi_crop, two_views


def test_make_views_batch_function(tiny_dataset):
    import pyarrow.parquet as pq

    m = read_manifest(tiny_dataset)
    table = pq.read_table(m.files("train")[0]).slice(0, 10)
    out = MakeViews(two_views(12), m.channels, m.image_size)({c: table[c].to_numpy(zero_copy_only=False)
                                                              for c in table.column_names})
    assert set(out) == {"view0", "view1", "index", "label"}
    assert out["view0"].shape == (10, 1, 12, 12) and out["view0"].dtype == np.uint8
    assert out["index"].tolist() == table["index"].to_pylist()
    assert not np.array_equal(out["view0"], out["view1"])


@pytest.mark.ray
def test_ray_stream_shapes_dtypes_and_distinct_views(local_ray, tiny_dataset):
    m = read_manifest(tiny_dataset)
    ds = train_dataset(DataConfig(path=tiny_dataset, batch_rows=16), m, two_views(16))
    batches = list(ds.iter_torch_batches(batch_size=32, drop_last=False))
    n = sum(b["index"].shape[0] for b in batches)
    assert n == m.count("train")
    b = batches[0]
    assert b["view0"].shape[1:] == (1, 16, 16) and str(b["view0"].dtype) == "torch.uint8"
    assert (b["view0"] != b["view1"]).any(dim=(1, 2, 3)).float().mean() > 0.9   # nearly every pair differs
    # every training image arrives exactly once per epoch, labelled as stored
    idx = np.concatenate([bb["index"].numpy() for bb in batches])
    assert sorted(idx.tolist()) == list(range(m.count("train")))
    _, labels, index = load_split(tiny_dataset, "train")
    label_of = dict(zip(index.tolist(), labels.tolist()))
    got = np.concatenate([bb["label"].numpy() for bb in batches])
    assert [label_of[i] for i in idx.tolist()] == got.tolist()


@pytest.mark.ray
def test_ray_stream_multi_crop_columns(local_ray, tiny_dataset):
    m = read_manifest(tiny_dataset)
    vs = multi_crop(16, 8, n_local=3)
    b = next(iter(train_dataset(DataConfig(path=tiny_dataset, limit=20), m, vs).iter_torch_batches(batch_size=20)))
    assert [tuple(b[c].shape) for c in vs.columns] == [(20, 1, 16, 16)] * 2 + [(20, 1, 8, 8)] * 3


@pytest.mark.ray
def test_ray_stream_yields_a_shard_file_in_several_blocks(local_ray, tmp_path):
    """With more task slots than shard files (here 8 on the test Ray, one file), a file is read as several blocks, so
    every slot has work from a pass's start instead of one task decoding the whole file."""
    from sslab.datasets import shards, sources
    from conftest import make_image_folder

    folder = make_image_folder(str(tmp_path / "images"), n_per_class=60, size=(16, 16))
    src = sources.image_folder(folder, size=16, channels=1, test_fraction=0.0)
    shards.prepare(src.records, str(tmp_path / "shards"), name="one", classes=src.classes, shard_rows=1000,
                   progress=lambda s: None)
    m = read_manifest(str(tmp_path / "shards"))
    assert len(m.files("train")) == 1
    ds = train_dataset(DataConfig(path=str(tmp_path / "shards"), batch_rows=16), m, two_views(16)).materialize()
    assert ds.num_blocks() >= 4
    assert sorted(np.concatenate([b["index"] for b in ds.iter_batches(batch_size=None)]).tolist()) == list(range(120))


def test_an_unreadable_row_without_a_log_is_an_error_naming_it(tiny_dataset):
    import pyarrow.parquet as pq

    m = read_manifest(tiny_dataset)
    table = pq.read_table(m.files("train")[0]).slice(0, 6)
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    batch["image"][3] = b"garbage"
    with pytest.raises(ValueError, match=f"training row with index {batch['index'][3]}: UnidentifiedImageError"):
        MakeViews(two_views(12), m.channels, m.image_size)(batch)


@pytest.mark.ray
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_ray_stream_of_decoded_images_for_views_made_in_the_worker(local_ray, tiny_dataset, tmp_path, encoding):
    # data.augment=worker: the stream carries each image once, decoded (from PNG or raw shards), and the worker's
    # views of it equal the pipeline function's for the same key
    import torch

    from sslab.datasets import shards
    from sslab.datasets.views import make_views, view_key

    data = tiny_dataset
    if encoding == "raw":
        images, labels, index = load_split(tiny_dataset, "train")
        records = [("train", img.transpose(1, 2, 0), int(lab), str(i)) for img, lab, i in zip(images, labels, index)]
        data = shards.prepare(records, tmp_path / "raw", name="tiny", classes=("a", "b"), encoding="raw",
                              progress=None)["out_dir"]
    m = read_manifest(data)
    batches = list(train_dataset(DataConfig(path=data, batch_rows=16), m, None).iter_torch_batches(batch_size=32))
    assert set(batches[0]) == {"image", "index", "label"}
    assert batches[0]["image"].shape[1:] == (1, 16, 16) and batches[0]["image"].dtype == torch.uint8
    images, _, index = load_split(tiny_dataset, "train")
    got = {int(i): img for b in batches for i, img in zip(b["index"], b["image"])}
    assert sorted(got) == sorted(index.tolist()) and all(np.array_equal(got[int(i)], img)
                                                          for i, img in zip(index, images))
    b, vs, key = batches[0], multi_crop(12, 8, 2), view_key(5, 2)
    worker = make_views(b["image"], vs, key, b["index"])
    table = {"image": [shards.encode_image(img.numpy().transpose(1, 2, 0), "png") for img in b["image"]],
             "index": b["index"].numpy(), "label": b["label"].numpy()}
    pipeline = MakeViews(vs, m.channels, m.image_size, key=key)(table)
    assert all(np.array_equal(worker[c].numpy(), pipeline[c]) for c in vs.columns)


@pytest.mark.ray
def test_training_batches_are_made_up_anew_every_pass(local_ray, tiny_dataset):
    # shards keep their row order and blocks their rows: without the worker's shuffle buffer every pass groups the
    # same images into a batch; with it, batches differ between passes and a pass still covers each row once
    from sslab.datasets.pipeline import training_batches

    import dataclasses

    m = read_manifest(tiny_dataset)
    first = m.splits["train"][0]                     # one shard file (40 rows): the file order cannot change
    m = dataclasses.replace(m, splits={"train": (first,)})
    ds = train_dataset(DataConfig(path=tiny_dataset, batch_rows=16), m, None)

    def groups(shuffle_rows):
        return [frozenset(b["index"].tolist()) for b in training_batches(ds, 8, shuffle_rows)]

    same = [groups(0) for _ in range(2)]
    assert set(same[0]) == set(same[1]), "in stream order the batches are the same sets of images every pass"
    mixed = [groups(32) for _ in range(2)]
    assert set(mixed[0]) != set(mixed[1])
    for g in same + mixed:
        rows = [i for batch in g for i in batch]
        assert len(g) == first.rows // 8 and len(rows) == len(set(rows)) == first.rows // 8 * 8


class Blocks:
    """A stream as training_batches reads it (Ray's iter_batches of whole blocks), counting the rows handed out."""

    def __init__(self, sizes):
        self.sizes, self.read = sizes, 0

    def iter_batches(self, batch_size, batch_format):
        assert batch_size is None and batch_format == "numpy"
        start = 0
        for n in self.sizes:
            index = np.arange(start, start + n)
            start += n
            self.read += n
            yield {"index": index, "label": 3 * index, "image": (np.repeat(index, 4).reshape(n, 1, 2, 2) % 256).astype(np.uint8)}


def test_training_batches_draw_whole_batches_from_the_rows_at_hand():
    import torch

    from sslab.datasets.pipeline import training_batches

    sizes = [10, 3, 25, 7, 40, 1, 30]                  # 116 rows in blocks of any size
    total, block_of = sum(sizes), np.repeat(np.arange(len(sizes)), sizes)
    in_order = [b["index"].tolist() for b in training_batches(Blocks(sizes), 8, 0)]
    assert [i for b in in_order for i in b] == list(range(total // 8 * 8)), "shuffle_rows 0: the stream's order"

    stream = Blocks(sizes)
    batches, kept_back = [], []
    for b in training_batches(stream, 8, 16, seed=1):
        batches.append(b)
        kept_back.append(stream.read - 8 * len(batches))
    rows = [i for b in batches for i in b["index"].tolist()]
    assert len(batches) == total // 8 and all(b["index"].shape == (8,) for b in batches)
    assert len(rows) == len(set(rows)) and set(rows) <= set(range(total))
    # while blocks still come, at least shuffle_rows rows stay behind to mix with the next; the end takes them
    assert min(kept_back[:-2]) >= 16 and kept_back[-1] == total % 8
    for b in batches:                                  # every column follows the same rows
        assert b["label"].tolist() == (3 * b["index"]).tolist()
        assert b["image"].dtype == torch.uint8 and (b["image"][:, 0, 0, 0] == b["index"] % 256).all()
    assert rows != sorted(rows) and any(len(set(block_of[b["index"].numpy()])) > 1 for b in batches)
    again = [b["index"].tolist() for b in training_batches(Blocks(sizes), 8, 16, seed=1)]
    other = [b["index"].tolist() for b in training_batches(Blocks(sizes), 8, 16, seed=2)]
    assert again == [b["index"].tolist() for b in batches] and other != again
