"""Sources -> Parquet shards -> readers, on tiny generated images (no Ray)."""
import gzip
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sslab.datasets.shards import decode_images, load_split, prepare, read_manifest
from sslab.datasets.sources import (FASHION_MNIST_CLASSES, SYSTEM_FASHION_MNIST, Record, Skipped, fashion_mnist,
                                    image_folder, read_idx)

QUIET = dict(progress=None)


def write_idx(path: Path, array: np.ndarray, magic_dtype: int = 0x08) -> None:
    """Independent IDX writer: 0x0000, dtype code, ndim, big-endian uint32 dims, then the bytes."""
    header = struct.pack(">HBB", 0, magic_dtype, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


def make_folder(root: Path, n: int = 12, size=(20, 16), classes=("cat", "dog")) -> dict:
    """n images of size (W, H) spread over class sub-folders; every third one grayscale. Returns path -> array."""
    rng = np.random.default_rng(0)
    made = {}
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        w, h = size
        arr = rng.integers(0, 256, (h, w) if i % 3 == 0 else (h, w, 3), dtype=np.uint8)
        path = d / f"img{i:02d}.png"
        Image.fromarray(arr).save(path)
        made[path] = arr
    return made


def expected_pixels(path: Path, size: int, mode: str) -> np.ndarray:
    """Reference for the source's resize: shorter side -> size (bicubic), centre crop; written out by hand."""
    img = Image.open(path).convert(mode)
    w, h = img.size
    nw, nh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(img)[y0:y0 + size, x0:x0 + size]
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)   # C x H x W


def read_parquet_rows(out: Path, split: str):
    """All rows of a split straight from the parquet files (not via load_split)."""
    m = json.loads((out / "manifest.json").read_text())
    tables = [pq.read_table(out / f["path"]) for f in m["splits"][split]["files"]]
    return [row for t in tables for row in t.to_pylist()]


# ------------------------------------------------------------------------------------------------ IDX

def test_idx_round_trip_and_bad_magic(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), a)
    (tmp_path / "plain-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([7, 8, 9]))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-idx1-ubyte"), [7, 8, 9])

    (tmp_path / "bad.gz").write_bytes(gzip.compress(struct.pack(">HBBI", 0x0803, 8, 1, 3) + b"abc"))
    with pytest.raises(ValueError, match=r"bad\.gz.*magic"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 5) + b"abc"))
    with pytest.raises(ValueError, match=r"short\.gz.*5"):
        read_idx(tmp_path / "short.gz")


# ------------------------------------------------------------------------------------------ folders

def test_folder_round_trip(tmp_path):
    made = make_folder(tmp_path / "src")
    src = image_folder(tmp_path / "src", size=8, channels=3, test_fraction=0.25)
    assert src.classes == ("cat", "dog")
    summary = prepare(src, tmp_path / "out", **QUIET)
    m = read_manifest(tmp_path / "out")
    assert m.image_size == (8, 8) and m.channels == 3 and m.classes == ("cat", "dog") and m.num_classes == 2
    assert m.count("train") + m.count("test") == 12 == sum(summary["counts"].values())
    assert m.count("test") > 0 and m.count("train") > 0          # the hash split put some in each here
    assert m.verify_checksums() == len(m.files("train")) + len(m.files("test"))

    split_of = {Path(r.origin): r.split for r in src}                # the hash split, as the source made it
    for split in ("train", "test"):
        images, labels, index = load_split(tmp_path / "out", split)
        assert images.shape == (m.count(split), 3, 8, 8) and images.dtype == np.uint8
        assert sorted(index.tolist()) == list(range(m.count(split)))
        # Rows are written in the source's (seeded, shuffled) order: rebuild that order per split.
        in_split = [Path(r.origin) for r in src if r.split == split]
        assert sorted(in_split) == sorted(p for p in made if split_of[p] == split)
        assert len(in_split) == len(images)
        for row, path in enumerate(in_split):
            np.testing.assert_array_equal(images[row], expected_pixels(path, 8, "RGB"))
            assert m.classes[labels[row]] == path.parent.name


def test_grayscale_and_nonsquare_resize(tmp_path):
    make_folder(tmp_path / "src", n=3, size=(30, 12))       # wide images: crop the sides
    src = image_folder(tmp_path / "src", size=10, channels=1, test_fraction=0.0)
    out = prepare(src, tmp_path / "out", **QUIET)
    assert out["counts"] == {"train": 3} and out["channels"] == 1
    images, labels, _ = load_split(tmp_path / "out", "train")
    for row, path in enumerate(Path(r.origin) for r in src):
        np.testing.assert_array_equal(images[row], expected_pixels(path, 10, "L"))


def test_other_formats(tmp_path):
    rng = np.random.default_rng(3)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rgb(300, 400).save(tmp_path / "big.JPG", quality=90)           # JPEG draft-decoding path
    for suffix in ("gif", "bmp", "webp", "tif"):
        rgb(9, 11).save(tmp_path / f"x.{suffix}")
    Image.fromarray(np.full((9, 11), 40000, np.uint16)).save(tmp_path / "deep.png")   # 16-bit grey
    records = {Path(r.origin).name: r for r in image_folder(tmp_path, size=8, channels=1, test_fraction=0.0)}
    assert sorted(records) == ["big.JPG", "deep.png", "x.bmp", "x.gif", "x.tif", "x.webp"]
    assert all(isinstance(r, Record) and r.image.shape == (8, 8, 1) for r in records.values())
    assert records["deep.png"].image.max() == 40000 >> 8             # rescaled, not clipped to 255


def test_folder_order_is_shuffled_not_class_sorted(tmp_path):
    # class-sorted shards would make every training batch single-class
    make_folder(tmp_path / "src", n=20)
    src = image_folder(tmp_path / "src", size=8, channels=1, test_fraction=0.0)
    names = [Path(r.origin).parent.name for r in src]
    assert names != sorted(names) and set(names[:10]) == {"cat", "dog"}
    assert names == [Path(r.origin).parent.name for r in src]      # seeded: the same order every pass


def test_top_level_images_have_no_label_and_limit(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((6, 6, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.PNG")   # upper-case suffix
    src = image_folder(tmp_path, size=6, test_fraction=0.0)
    assert src.classes == ()
    prepare(src, tmp_path / "out", **QUIET)
    assert read_manifest(tmp_path / "out").classes == ()
    images, labels, index = load_split(tmp_path / "out", "train", limit=2)
    assert labels.tolist() == [-1, -1] and index.tolist() == [0, 1]
    first_two = [int(Path(r.origin).stem) * 40 for r in src][:2]   # the first rows in written order
    assert images[:, 0, 0, 0].tolist() == first_two
    assert all(r["label"] is None for r in read_parquet_rows(tmp_path / "out", "train"))


def test_corrupt_and_empty_files_are_skipped(tmp_path):
    make_folder(tmp_path / "src", n=4)
    bad = tmp_path / "src" / "cat" / "x.png"
    bad.write_bytes(np.random.default_rng(1).bytes(300))
    empty = tmp_path / "src" / "dog" / "empty.jpg"
    empty.write_bytes(b"")
    summary = prepare(image_folder(tmp_path / "src", size=8, test_fraction=0.0), tmp_path / "out", **QUIET)
    assert summary["counts"] == {"train": 4} and summary["num_skipped"] == 2
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_skipped"] == 2
    assert {s["origin"] for s in m["skipped"]} == {str(bad), str(empty)}
    assert all(s["reason"] and s["split"] == "train" for s in m["skipped"])


def test_shape_mismatch_is_a_skip(tmp_path):
    ok = np.zeros((4, 4, 1), np.uint8)
    records = [Record("train", ok, 0, "a"), Record("train", np.zeros((5, 4, 1), np.uint8), 0, "b"),
               Record("train", np.zeros((4, 4, 3), np.uint8), 0, "c"), Skipped("test", "d", "broken"),
               Record("train", ok, 1, "e")]
    summary = prepare(records, tmp_path / "out", name="toy", classes=["a", "b"], **QUIET)
    assert summary["counts"] == {"train": 2} and summary["num_skipped"] == 3
    reasons = {s["origin"]: s["reason"] for s in json.loads((tmp_path / "out/manifest.json").read_text())["skipped"]}
    assert "5x4x1" in reasons["b"] and "4x4x1" in reasons["b"] and "4x4x3" in reasons["c"]


def test_no_readable_images_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no readable images"):
        prepare(image_folder(tmp_path / "empty"), tmp_path / "out", **QUIET)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"junk.*no readable images \(1 skipped.*a\.png"):
        prepare(image_folder(tmp_path / "junk"), tmp_path / "out2", **QUIET)
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_existing_output_needs_force(tmp_path):
    make_folder(tmp_path / "src", n=4)
    prepare(image_folder(tmp_path / "src", size=8), tmp_path / "out", **QUIET)
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        prepare(image_folder(tmp_path / "src", size=8), tmp_path / "out", **QUIET)
    summary = prepare(image_folder(tmp_path / "src", size=6), tmp_path / "out", force=True, **QUIET)
    assert read_manifest(tmp_path / "out").image_size == (6, 6) == tuple(summary["image_size"])
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"      # only shards + manifest are removed


def test_force_replaces_only_when_complete_and_only_its_own_files(tmp_path):
    """`--force` over a good dataset from a source that fails keeps the good dataset; a successful replace removes
    the files the old manifest listed and nothing else, even other Parquet files."""
    make_folder(tmp_path / "src", n=12)
    out = tmp_path / "out"
    prepare(image_folder(tmp_path / "src", size=8, test_fraction=0.0), out, shard_rows=5, **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "my_sales.parquet").write_bytes(b"the user's own file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        prepare(image_folder(tmp_path / "empty"), out, force=True, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "my_sales.parquet"} == before
    assert read_manifest(out).count("train") == 12
    prepare(image_folder(tmp_path / "src", size=8, test_fraction=0.0), out, force=True, shard_rows=20, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "my_sales.parquet", "train-00000.parquet"]
    assert (out / "my_sales.parquet").read_bytes() == b"the user's own file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging folder left
    (out / "train-00001.parquet").write_bytes(b"not ours")                        # a name the next write needs
    with pytest.raises(FileExistsError, match="train-00001.parquet is in the way"):
        prepare(image_folder(tmp_path / "src", size=8, test_fraction=0.0), out, force=True, shard_rows=5, **QUIET)
    assert read_manifest(out).count("train") == 12 and (out / "train-00001.parquet").read_bytes() == b"not ours"


def test_streaming_shards(tmp_path):
    make_folder(tmp_path / "src", n=12)
    lines = []
    prepare(image_folder(tmp_path / "src", size=8, test_fraction=0.0), tmp_path / "out", shard_rows=5,
            progress=lines.append)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    files = m["splits"]["train"]["files"]
    assert [f["path"] for f in files] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert [f["rows"] for f in files] == [5, 5, 2]
    assert [pq.ParquetFile(tmp_path / "out" / f["path"]).metadata.num_rows for f in files] == [5, 5, 2]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == [f["path"] for f in files]
    rows = read_parquet_rows(tmp_path / "out", "train")
    assert [r["index"] for r in rows] == list(range(12))
    assert sum("wrote train-" in line for line in lines) == 3 and "done" in lines[-1]
    assert pq.read_schema(tmp_path / "out" / files[0]["path"]).names == ["image", "label", "index"]


def test_mean_std_match_numpy(tmp_path):
    rng = np.random.default_rng(2)
    train = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(9)]
    test = [np.full((5, 7, 3), 255, np.uint8)]                     # must not enter the statistics
    records = [Record("train", a, None, f"t{i}") for i, a in enumerate(train)] + [Record("test", test[0], None, "x")]
    summary = prepare(records, tmp_path / "out", name="toy", **QUIET)
    pixels = np.stack(train).astype(np.float64).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(summary["mean"], pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(summary["std"], pixels.std(0), rtol=1e-10)
    m = read_manifest(tmp_path / "out")
    np.testing.assert_allclose(m.mean, pixels.mean(0), rtol=1e-12)


def test_explicit_split_folders(tmp_path):
    make_folder(tmp_path / "src" / "train", n=6)
    make_folder(tmp_path / "src" / "val", n=3, classes=("dog", "emu", "cat"))
    src = image_folder(tmp_path / "src", size=8, test_fraction=0.5)
    assert src.classes == ("cat", "dog", "emu")                      # union of both splits, sorted
    summary = prepare(src, tmp_path / "out", **QUIET)
    assert summary["counts"] == {"train": 6, "test": 3}
    _, labels, _ = load_split(tmp_path / "out", "test")
    assert sorted(labels.tolist()) == [0, 1, 2]                      # cat, dog, emu: one each


def test_hash_split_is_deterministic(tmp_path):
    make_folder(tmp_path / "src", n=12)
    splits = [[(r.split, r.origin) for r in image_folder(tmp_path / "src", size=4, test_fraction=0.5, seed=s)]
              for s in (0, 0, 1)]
    assert splits[0] == splits[1]
    assert {s for s, _ in splits[0]} == {"train", "test"}
    assert splits[0] != splits[2]                                    # the seed changes the split


def test_decode_images_layout():
    import io
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)        # H=2, W=3, C=3
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    out = decode_images([buf.getvalue()] * 2, 3)
    assert out.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(out[1], rgb.transpose(2, 0, 1))
    assert decode_images([buf.getvalue()], 1).shape == (1, 1, 2, 3)    # converted to L on request
    from sslab.datasets.shards import decode_readable

    images, keep, bad = decode_readable([buf.getvalue(), b"\x89PNG but not really"], 3, (2, 3))
    assert keep == [0] and images.shape == (1, 3, 2, 3)
    assert bad == [(1, "UnidentifiedImageError: cannot identify image file")]   # not PIL's buffer and its address


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sslab data prepare"):
        read_manifest(tmp_path)
    prepare([Record("train", np.zeros((2, 2, 1), np.uint8), None, "a")], tmp_path / "out", name="t", **QUIET)
    path = tmp_path / "out" / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "channels"}))
    with pytest.raises(ValueError, match="manifest.json.*'channels'"):
        read_manifest(tmp_path / "out")
    path.write_text(json.dumps({**good, "mean": [0.1, 0.2]}))
    with pytest.raises(ValueError, match="'mean'"):
        read_manifest(tmp_path / "out")
    path.write_text(json.dumps(good))
    shard = tmp_path / "out" / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(ValueError, match="train-00000.parquet.*sha256"):
        read_manifest(tmp_path / "out").verify_checksums()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="train-00000.parquet"):
        read_manifest(tmp_path / "out")


# ------------------------------------------------------------------------------------------ Fashion-MNIST

needs_fmnist = pytest.mark.skipif(not SYSTEM_FASHION_MNIST.is_dir(),
                                  reason=f"{SYSTEM_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")


@needs_fmnist
def test_fashion_mnist_files():
    images = read_idx(SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert read_idx(SYSTEM_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").shape == (10000,)
    first = next(iter(fashion_mnist(SYSTEM_FASHION_MNIST)))
    assert first.split == "train" and first.image.shape == (28, 28, 1) and first.label == 9   # an ankle boot
    assert first.origin == "train-images-idx3-ubyte.gz[0]"
    np.testing.assert_array_equal(first.image[:, :, 0], images[0])


@needs_fmnist
def test_fashion_mnist_prepare_truncated(tmp_path):
    src = fashion_mnist(SYSTEM_FASHION_MNIST)
    first = lambda split: itertools.islice(filter(lambda r: r.split == split, src), 200)   # fresh pass each
    records = itertools.chain(first("train"), first("test"))
    summary = prepare(records, tmp_path / "out", name=src.name, classes=src.classes, shard_rows=150, **QUIET)
    assert summary["counts"] == {"train": 200, "test": 200}
    m = read_manifest(tmp_path / "out")
    assert m.classes == FASHION_MNIST_CLASSES and m.image_size == (28, 28) and m.channels == 1
    images, labels, _ = load_split(tmp_path / "out", "test")
    raw = read_idx(SYSTEM_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[:200]
    np.testing.assert_array_equal(images[:, 0], raw)
    np.testing.assert_array_equal(labels, read_idx(SYSTEM_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")[:200])


def test_dataset_read_through_a_uri(tmp_path):
    # shards on shared storage: the same manifest and pixels through a pyarrow URI as through the local path
    make_folder(tmp_path / "src", n=6)
    prepare(image_folder(tmp_path / "src", size=8, channels=1, test_fraction=0.0), tmp_path / "out", **QUIET)
    local, uri = read_manifest(tmp_path / "out"), read_manifest(f"file://{tmp_path}/out")
    assert uri.count("train") == local.count("train") == 6 and uri.files("train")[0].startswith("file://")
    assert uri.verify_checksums() == len(uri.files("train"))
    np.testing.assert_array_equal(load_split(f"file://{tmp_path}/out", "train")[0],
                                  load_split(tmp_path / "out", "train")[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_raw_encoding_stores_the_same_pixels_undecoded(tmp_path, channels):
    make_folder(tmp_path / "src", n=12, size=(12, 10))
    src = lambda: image_folder(tmp_path / "src", size=8, channels=channels, test_fraction=0.25)
    png = prepare(src(), tmp_path / "png", **QUIET)
    raw = prepare(src(), tmp_path / "raw", encoding="raw", **QUIET)
    assert read_manifest(png["out_dir"]).encoding == "png" and read_manifest(raw["out_dir"]).encoding == "raw"
    assert raw["mean"] == png["mean"]
    for split in ("train", "test"):
        a, b = load_split(png["out_dir"], split), load_split(raw["out_dir"], split)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # the stored bytes are the C x H x W pixels themselves
    first = pq.read_table(read_manifest(raw["out_dir"]).files("train")[0]).column("image")[0].as_py()
    assert len(first) == channels * 8 * 8
    assert np.array_equal(np.frombuffer(first, np.uint8).reshape(channels, 8, 8), load_split(raw["out_dir"], "train")[0][0])
    read_manifest(raw["out_dir"]).verify()
    with pytest.raises(ValueError, match="encoding must be one of png, raw"):
        prepare(src(), tmp_path / "bad", encoding="jpeg", **QUIET)


def test_raw_rows_of_the_wrong_length_are_skipped_and_named(tmp_path):
    from sslab.datasets.shards import decode_readable

    good = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    rows = [good[0].tobytes(), b"\x00" * 5, good[1].tobytes()]
    images, keep, bad = decode_readable(rows, 1, (4, 4), "raw")
    assert keep == [0, 2] and np.array_equal(images, good)
    assert bad == [(1, "raw image of 5 bytes; a 1x4x4 one has 16")]
    # a manifest declaring a size the raw rows do not have is caught before training, naming the file and row
    make_folder(tmp_path / "src", n=6, size=(8, 8))
    out = prepare(image_folder(tmp_path / "src", size=8, channels=1, test_fraction=0.0), tmp_path / "raw",
                  encoding="raw", **QUIET)
    path = Path(out["manifest"])
    m = json.loads(path.read_text())
    m["image_size"] = [7, 8]
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"train-00000.parquet: row with index 0 holds 64 bytes; .* declares raw "
                                         r"7x8 L images"):
        read_manifest(out["out_dir"]).verify()
