"""Parquet shards: write a source once (`prepare`), read it many times (`read_manifest`, `load_split`).

On disk, `out_dir/` holds `{split}-{k:05d}.parquet` files with columns
    image: binary  (lossless PNG bytes, or with encoding "raw" the image's uint8 pixels in C x H x W order)
    label: int64   (null when unknown)
    index: int64   (0..N-1 per split, in the order written: a stable id for kNN and debugging)
and `manifest.json`, written last (temp file + rename): a folder with a manifest is complete. `prepare` writes a
new dataset into a staging folder beside the target and moves it in only once it is complete; replacing a dataset
(`force`) removes only the files the old manifest lists, never anything else in the folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
_ROW_GROUP = 1000        # rows buffered before a row group is flushed: bounds prepare's memory
_MAX_LISTED_SKIPS = 10000  # manifest lists at most this many skipped files; num_skipped is always exact
_MODES = {1: "L", 3: "RGB"}
ENCODINGS = ("png", "raw")   # raw: no decoding at all (numpy view of the bytes); zstd still compresses the file


def _filesystem(path: Union[str, Path]):
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, file://, ...)."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(str(path)) if "://" in str(path) else (fs.LocalFileSystem(), str(path))


def _open(path: Union[str, Path]):
    filesystem, inner = _filesystem(path)
    return filesystem.open_input_file(inner)


def sha256_file(path: Union[str, Path]) -> str:
    """The sha256 of a file (local path or URI), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with _open(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """uint8 H x W x C -> the `image` column's bytes in `encoding`."""
    return encode_png(image) if encoding == "png" else np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 H x W x C -> PNG bytes. compress_level=1: ~3x faster than the default 6 for a few % more bytes."""
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class _SplitWriter:
    """Streams one split into rolling Parquet files of `shard_rows` rows, `_ROW_GROUP` rows buffered at a time."""

    def __init__(self, out_dir: Path, split: str, shard_rows: int):
        self.out_dir, self.split, self.shard_rows = out_dir, split, shard_rows
        self.count = 0                      # rows written (and next index)
        self.files: list[dict] = []         # manifest entries of closed files
        self.writer: Optional[pq.ParquetWriter] = None
        self.path: Optional[Path] = None
        self.rows_in_file = 0
        self.buf: tuple[list, list] = ([], [])   # png bytes, labels

    def add(self, png: bytes, label: Optional[int]) -> Optional[str]:
        """Buffer one row; returns the file name when that row completed a shard."""
        self.buf[0].append(png)
        self.buf[1].append(label)
        if len(self.buf[0]) >= min(_ROW_GROUP, self.shard_rows - self.rows_in_file):
            self._flush()
            if self.rows_in_file == self.shard_rows:
                return self._close()
        return None

    def _flush(self) -> None:
        pngs, labels = self.buf
        if not pngs:
            return
        if self.writer is None:
            self.path = self.out_dir / f"{self.split}-{len(self.files):05d}.parquet"
            # PNG is already compressed and unique per row: no dictionary, no min/max statistics for `image`.
            self.writer = pq.ParquetWriter(self.path, SCHEMA, compression="zstd", use_dictionary=["label"],
                                           write_statistics=["label", "index"])
        index = np.arange(self.count, self.count + len(pngs), dtype=np.int64)
        self.writer.write_table(pa.table([pa.array(pngs, pa.binary()), pa.array(labels, pa.int64()),
                                          pa.array(index)], schema=SCHEMA))
        self.count += len(pngs)
        self.rows_in_file += len(pngs)
        self.buf = ([], [])

    def _close(self) -> Optional[str]:
        if self.writer is None:
            return None
        self.writer.close()
        self.files.append({"path": self.path.name, "rows": self.rows_in_file, "sha256": sha256_file(self.path)})
        self.writer, self.rows_in_file = None, 0
        return self.path.name

    def finish(self) -> Optional[str]:
        self._flush()
        return self._close()


def _old_outputs(out_dir: Path, force: bool) -> list[Path]:
    """The files of the dataset already in `out_dir` (those its manifest lists, then the manifest); refuses to
    replace them without `force`."""
    if not (out_dir / MANIFEST).is_file():
        return []
    if not force:
        raise FileExistsError(f"{out_dir} already holds a prepared dataset ({MANIFEST}): pass --force (force=True) "
                              f"to replace it, or choose another output folder")
    try:
        splits = json.loads((out_dir / MANIFEST).read_text())["splits"]
        listed = [f["path"] for s in splits.values() for f in s["files"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        listed = []                  # an unreadable manifest lists nothing: only the manifest itself is replaced
    return [out_dir / p for p in listed if "/" not in p and (out_dir / p).is_file()] + [out_dir / MANIFEST]


def _swap_in(stage: Path, out_dir: Path, old: list[Path]) -> None:
    """Move the complete dataset in `stage` into `out_dir`, replacing `old` (manifest first out, last in)."""
    new = sorted(p for p in stage.iterdir() if p.name != MANIFEST)
    taken = [out_dir / p.name for p in new if (out_dir / p.name).exists() and out_dir / p.name not in old]
    if taken:
        raise FileExistsError(f"{taken[0]} is in the way and is not part of the dataset being replaced: move it, "
                              f"or choose another output folder (the new dataset is complete in {stage})")
    for p in reversed(old):          # the manifest first: a half-replaced folder must not look complete
        p.unlink(missing_ok=True)
    for p in new:
        os.replace(p, out_dir / p.name)
    os.replace(stage / MANIFEST, out_dir / MANIFEST)
    stage.rmdir()


def prepare(source_records: Iterable, out_dir: Union[str, Path], *, name: Optional[str] = None,
            classes: Optional[Sequence[str]] = None, force: bool = False, shard_rows: int = 10000,
            progress: Optional[Callable[[str], None]] = print, encoding: str = "png") -> dict:
    """Stream `(split, image, label, origin)` records (or `Skipped`) into Parquet shards plus a manifest. Images
    are stored as PNG (`encoding`, the default: small) or raw pixels (no decoding when read: for small images
    where decoding is the pipeline's cost; zstd compresses the pixels: Fashion-MNIST's shards are 30 MB raw, 33 MB
    as PNG)

    `name` and `classes` default to the source's own (`sources.Source`). Per-channel mean/std of the train split
    are accumulated exactly (integer sums of x and x^2) and reported on the [0, 1] scale. Returns a summary.
    """
    out_dir = Path(out_dir)
    name = name if name is not None else getattr(source_records, "name", None)
    if not name:
        raise ValueError("prepare needs a dataset name (name=...)")
    classes = list(classes if classes is not None else getattr(source_records, "classes", ()))
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    where = getattr(source_records, "location", name)
    say = progress or (lambda _msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = _old_outputs(out_dir, force)
    stage = out_dir.parent / f".{out_dir.name}.preparing-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        summary = _write(source_records, stage, name, classes, shard_rows, where, say, encoding)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)         # the old dataset, if any, is untouched
        raise
    _swap_in(stage, out_dir, old)
    say(f"[{name}] done: {summary['counts']}, skipped {summary['num_skipped']}, "
        f"{'x'.join(map(str, summary['image_size']))}x{summary['channels']} -> {out_dir}")
    return summary | {"out_dir": str(out_dir), "manifest": str(out_dir / MANIFEST)}


def _write(source_records, out_dir: Path, name: str, classes: list, shard_rows: int, where: str, say,
           encoding: str = "png") -> dict:
    """The dataset of `source_records` written into `out_dir` (shards, then the manifest)."""

    writers: dict[str, _SplitWriter] = {}
    skipped: list[dict] = []
    num_skipped = 0
    shape: Optional[tuple[int, int, int]] = None     # H x W x C fixed by the first readable image
    first_origin = ""
    sums: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # split -> (sum x, sum x^2, pixels) per channel

    def skip(split: str, origin: str, reason: str) -> None:
        nonlocal num_skipped
        num_skipped += 1
        if len(skipped) < _MAX_LISTED_SKIPS:
            skipped.append({"origin": origin, "split": split, "reason": reason})

    def report(done: Optional[str]) -> None:
        if done:
            counts = ", ".join(f"{s} {w.count}" for s, w in writers.items())
            say(f"[{name}] wrote {done}: {counts}, skipped {num_skipped}")

    for item in source_records:
        if len(item) == 3:                               # sources.Skipped(split, origin, reason)
            skip(*item)
            continue
        split, image, label, origin = item
        if not re.fullmatch(r"[a-z0-9_]+", split):
            raise ValueError(f"split name {split!r} (from {origin}) must match [a-z0-9_]+: it names files")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            skip(split, origin, f"expected a uint8 H x W x C image with C in (1, 3), got {image.dtype} "
                                f"{image.shape}")
            continue
        if shape is None:
            shape, first_origin = image.shape, origin
        elif image.shape != shape:
            skip(split, origin, f"shape {'x'.join(map(str, image.shape))} (H x W x C) differs from the "
                                f"dataset's {'x'.join(map(str, shape))} set by {first_origin}")
            continue
        if label is not None and classes and not 0 <= label < len(classes):
            raise ValueError(f"{origin}: label {label} out of range for {len(classes)} classes")
        if split not in writers:
            writers[split] = _SplitWriter(out_dir, split, shard_rows)
            c = shape[2]
            sums[split] = (np.zeros(c, np.int64), np.zeros(c, np.int64), 0)
        s1, s2, n = sums[split]
        x = image.reshape(-1, shape[2]).astype(np.int64)   # pixels x C; int64 sums of x^2 stay exact to ~1e14 px
        sums[split] = (s1 + x.sum(0), s2 + (x * x).sum(0), n + x.shape[0])
        report(writers[split].add(encode_image(image, encoding), None if label is None else int(label)))

    for w in writers.values():
        report(w.finish())
    if not writers:
        reasons = "; ".join(f"{s['origin']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"source {where!r} yielded no readable images ({num_skipped} skipped"
                         f"{': ' + reasons if reasons else ''})")

    # Normalisation statistics from train (from all splits if there is no train split), on the [0, 1] scale.
    stat_splits = ["train"] if "train" in sums else list(sums)
    s1 = sum(sums[s][0] for s in stat_splits) / 255.0
    s2 = sum(sums[s][1] for s in stat_splits) / 255.0 ** 2
    n = sum(sums[s][2] for s in stat_splits)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "image_size": [shape[0], shape[1]], "channels": shape[2],
        "classes": classes, "mean": mean.tolist(), "std": std.tolist(), "encoding": encoding,
        "splits": {s: {"count": w.count, "files": w.files} for s, w in writers.items()},
        "skipped": skipped, "num_skipped": num_skipped,
    }
    path = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)                                 # atomic: the manifest is whole or absent
    counts = {s: w.count for s, w in writers.items()}
    return {"name": name, "counts": counts,
            "image_size": [shape[0], shape[1]], "channels": shape[2], "mean": manifest["mean"],
            "std": manifest["std"], "num_skipped": num_skipped,
            "skipped_examples": [s["origin"] for s in skipped[:5]]}


# ----------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ShardFile:
    path: str          # absolute
    rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    root: str
    name: str
    image_size: tuple[int, int]           # H, W
    channels: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]               # per channel, [0, 1] scale, train split
    std: tuple[float, ...]
    splits: dict[str, tuple[ShardFile, ...]]
    num_skipped: int
    encoding: str = "png"                 # of the image column: png, or raw C x H x W uint8 pixels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def _split(self, split: str) -> tuple[ShardFile, ...]:
        if split not in self.splits:
            raise ValueError(f"{self.root}: no split {split!r} in the manifest (has: {', '.join(self.splits)})")
        return self.splits[split]

    def files(self, split: str) -> list[str]:
        return [f.path for f in self._split(split)]

    def count(self, split: str) -> int:
        """Rows in `split`; 0 for a split the dataset does not have (e.g. a folder with no held-out part)."""
        return sum(f.rows for f in self.splits.get(split, ()))

    def verify_checksums(self) -> int:
        """Recompute every shard's sha256; raises naming the first mismatch. Returns the number checked."""
        checked = 0
        for shards in self.splits.values():
            for f in shards:
                if sha256_file(f.path) != f.sha256:
                    raise ValueError(f"{f.path}: sha256 differs from the manifest (file changed or corrupt); "
                                     f"re-run `sslab data prepare ... --force`")
                checked += 1
        return checked

    def verify(self, checksums: bool = True, sample: int = 4) -> None:
        """The shards against the manifest, before any training: each file is Parquet with sslab's schema and the
        row count the manifest gives (and its sha256, with `checksums`), and its first `sample` images decode to
        the declared size and channels. Raises ValueError naming the file (and row)."""
        want = f"{self.image_size[0]}x{self.image_size[1]} {_MODES[self.channels]}"
        for f in (f for shards in self.splits.values() for f in shards):
            try:
                pf = pq.ParquetFile(_open(f.path))
            except Exception as e:  # pyarrow's ArrowInvalid and friends: not Parquet, truncated
                raise ValueError(f"{f.path}: not a readable Parquet file ({str(e).splitlines()[0]}); re-run "
                                 f"`sslab data prepare ... --force`") from None
            if not pf.schema_arrow.equals(SCHEMA):
                raise ValueError(f"{f.path}: columns {pf.schema_arrow.names} are not sslab's "
                                 f"(image: binary, label: int64, index: int64)")
            if pf.metadata.num_rows != f.rows:
                raise ValueError(f"{f.path}: {pf.metadata.num_rows} rows, the manifest says {f.rows}")
            if checksums and sha256_file(f.path) != f.sha256:
                raise ValueError(f"{f.path}: sha256 differs from the manifest (file changed or corrupt); re-run "
                                 f"`sslab data prepare ... --force`, or data.verify=false to train on it anyway")
            if not f.rows or not sample:
                continue
            rows = pf.read_row_group(0, columns=["image", "index"]).slice(0, sample)
            for png, index in zip(rows.column("image").to_pylist(), rows.column("index").to_pylist()):
                if self.encoding == "raw":
                    if len(png) != self.channels * self.image_size[0] * self.image_size[1]:
                        raise ValueError(f"{f.path}: row with index {index} holds {len(png)} bytes; "
                                         f"{self.root}/{MANIFEST} declares raw {want} images")
                    continue
                try:
                    with Image.open(io.BytesIO(png)) as img:
                        got = f"{img.size[1]}x{img.size[0]} {img.mode}"
                except Exception as e:
                    raise ValueError(f"{f.path}: row with index {index} is not a readable image ({e})") from None
                if got != want:
                    raise ValueError(f"{f.path}: row with index {index} is a {got} image; {self.root}/{MANIFEST} "
                                     f"declares {want}")


def read_manifest(data_dir: Union[str, Path]) -> Manifest:
    from pyarrow.fs import FileType

    # a URI stays a URI (shard paths are built on it, for Ray Data and load_split); a local path is made absolute
    root = str(data_dir).rstrip("/") if "://" in str(data_dir) else str(Path(data_dir).resolve())
    filesystem, inner = _filesystem(root)
    path = f"{root}/{MANIFEST}"
    if filesystem.get_file_info(f"{inner}/{MANIFEST}").type != FileType.File:
        raise FileNotFoundError(f"no {MANIFEST} in {root}: run `sslab data prepare ...` first")
    try:
        with filesystem.open_input_stream(f"{inner}/{MANIFEST}") as f:
            m = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

    def field(obj: dict, key: str, check: Callable[[object], bool], want: str, where: str = ""):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{path}: missing field '{where}{key}'")
        if not check(obj[key]):
            raise ValueError(f"{path}: field '{where}{key}' should be {want}, got {obj[key]!r}")
        return obj[key]

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    nums = lambda n: (lambda v: isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v))
    field(m, "format_version", lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION))
    size = field(m, "image_size", lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x) and x > 0
                                                                                         for x in v), "[H, W]")
    channels = field(m, "channels", lambda v: v in (1, 3), "1 or 3")
    splits: dict[str, tuple[ShardFile, ...]] = {}
    for split, info in field(m, "splits", lambda v: isinstance(v, dict) and v, "a non-empty object").items():
        files = field(info, "files", lambda v: isinstance(v, list), "a list", f"splits.{split}.")
        shards = []
        for i, f in enumerate(files):
            at = f"splits.{split}.files[{i}]."
            rel = field(f, "path", lambda v: isinstance(v, str) and v and not os.path.isabs(v), "a relative path",
                        at)
            shard = ShardFile(f"{root}/{rel}", field(f, "rows", lambda v: is_int(v) and v >= 0, "an int >= 0", at),
                              field(f, "sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256", at))
            if filesystem.get_file_info(f"{inner}/{rel}").type != FileType.File:
                raise FileNotFoundError(f"{shard.path} listed in {path} is missing: re-run `sslab data prepare "
                                        f"... --force`")
            shards.append(shard)
        count = field(info, "count", is_int, "an int", f"splits.{split}.")
        if count != sum(s.rows for s in shards):
            raise ValueError(f"{path}: splits.{split}.count {count} != sum of its files' rows "
                             f"{sum(s.rows for s in shards)}")
        splits[split] = tuple(shards)
    return Manifest(
        root=root, name=field(m, "name", lambda v: isinstance(v, str), "a string"),
        image_size=(size[0], size[1]), channels=channels,
        classes=tuple(field(m, "classes", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                            "a list of names")),
        mean=tuple(field(m, "mean", nums(channels), f"{channels} numbers")),
        std=tuple(field(m, "std", nums(channels), f"{channels} numbers")),
        splits=splits, num_skipped=field(m, "num_skipped", is_int, "an int"),
        encoding=field(m, "encoding", lambda v: v in ENCODINGS, " or ".join(ENCODINGS)) if "encoding" in m else "png")


def decode_images(pngs: Sequence[bytes], channels: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """PNG bytes -> uint8 N x C x H x W. The output is allocated once, from the first image's shape (or pass
    `out`); used in the Ray Data decode step, so no per-image copies beyond PIL's own buffer."""
    mode = _MODES[channels]
    for i, b in enumerate(pngs):
        with Image.open(io.BytesIO(b)) as img:
            if img.mode != mode:
                img = img.convert(mode)
            a = np.asarray(img)              # H x W (L) or H x W x 3 (RGB)
        if out is None:
            out = np.empty((len(pngs), channels, a.shape[0], a.shape[1]), np.uint8)
        if a.shape[:2] != out.shape[2:]:
            raise ValueError(f"image {i} is {a.shape[0]}x{a.shape[1]}, batch is {out.shape[2]}x{out.shape[3]}")
        if channels == 1:
            out[i, 0] = a
        else:
            out[i] = a.transpose(2, 0, 1)    # H x W x C -> C x H x W
    return out if out is not None else np.empty((0, channels, 0, 0), np.uint8)


def decode_readable(pngs: Sequence[bytes], channels: int, size: tuple[int, int], encoding: str = "png"
                    ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """PNG (or raw) bytes -> uint8 [k, C, H, W] of the rows that decode to `size` (H, W), the positions of those
    rows, and (position, reason) for each of the others: one bad image costs its row, not the batch."""
    if encoding == "raw":
        want = channels * size[0] * size[1]
        keep = [i for i, b in enumerate(pngs) if b is not None and len(b) == want]
        bad = [(i, f"raw image of {len(b) if b is not None else 0} bytes; a {channels}x{size[0]}x{size[1]} one "
                   f"has {want}") for i, b in enumerate(pngs) if b is None or len(b) != want]
        raw = np.frombuffer(b"".join(pngs[i] for i in keep), np.uint8)
        return raw.reshape(len(keep), channels, *size), keep, bad
    out = np.empty((len(pngs), channels, *size), np.uint8)
    keep, bad = [], []
    for i, png in enumerate(pngs):
        try:
            decode_images([png], channels, out=out[len(keep):len(keep) + 1])
        except Exception as e:  # PIL's UnidentifiedImageError, OSError (truncated), our size check
            bad.append((i, f"{type(e).__name__}: {re.sub(r' <[^<>]* at 0x[0-9a-f]+>', '', str(e))}"))  # no repr
            continue
        keep.append(i)
    return out[:len(keep)], keep, bad


def load_split(data_dir: Union[str, Path], split: str, limit: Optional[int] = None, skip_bad: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole split in memory (for kNN / linear probes): images uint8 N x C x H x W, labels int64 N (-1 when
    unknown), index int64 N. `limit` keeps the first `limit` rows in file order (deterministic). An unreadable
    image is an error naming its file and row, or with `skip_bad` its row is left out (fewer than `limit` rows)."""
    m = read_manifest(data_dir)
    n = m.count(split) if limit is None else min(int(limit), m.count(split))
    images = np.empty((n, m.channels, *m.image_size), np.uint8)
    labels = np.empty(n, np.int64)
    index = np.empty(n, np.int64)
    at = 0
    for path in m.files(split):
        if at >= n:
            break
        for batch in pq.ParquetFile(_open(path)).iter_batches(batch_size=4096):
            take = min(batch.num_rows, n - at)
            if take <= 0:
                break
            batch = batch.slice(0, take)
            decoded, keep, bad = decode_readable(batch.column("image").to_pylist(), m.channels, m.image_size,
                                                 m.encoding)
            if bad and not skip_bad:
                raise ValueError(f"{path}: row with index {batch.column('index')[bad[0][0]]} is not a readable "
                                 f"{m.image_size[0]}x{m.image_size[1]} image ({bad[0][1]})")
            got = len(keep)
            images[at:at + got] = decoded
            labels[at:at + got] = batch.column("label").fill_null(-1).to_numpy()[keep]
            index[at:at + got] = batch.column("index").to_numpy()[keep]
            at, n = at + got, n - (take - got)
    if at != n:
        raise ValueError(f"{m.root}: split {split!r} has {at} rows in its files, manifest says {n}")
    return images[:n], labels[:n], index[:n]
