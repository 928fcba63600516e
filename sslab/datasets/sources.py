"""Where images come from: generators of decoded images, one record at a time (no Ray here).

A source yields `Record(split, image, label, origin)` (image: uint8 H x W x C, C = 1 or 3; label: int or None)
or `Skipped(split, origin, reason)` for an unreadable image, so `shards.prepare` counts and lists bad files
instead of crashing on one. Sources are re-iterable (`iter()` starts a fresh pass) and never hold more than one
decoded image at a time, except the IDX arrays, which are the file itself (47 MB for Fashion-MNIST train).

Sources are registered by name (`@SOURCES.register("name")` on a function returning a `Source`): `sslab data
prepare NAME [LOCATION] --option ...` offers every registered name, passes LOCATION as the function's first
argument and the options its signature names (`build` refuses the others), so a new source is one function here.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np

from ..config import ConfigError
from ..registry import Registry

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")   # Debian's dataset-fashion-mnist package
CACHE_DIR = Path.home() / ".cache" / "sslab"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class Record(NamedTuple):
    split: str
    image: np.ndarray        # uint8 H x W x C, C in (1, 3)
    label: Optional[int]     # None when unknown
    origin: str              # file path, or "train-images-idx3-ubyte.gz[123]"


class Skipped(NamedTuple):
    split: str
    origin: str
    reason: str


Item = Union[Record, Skipped]


@dataclass(frozen=True)
class Source:
    """A re-iterable stream of records plus what `prepare` needs to know about it."""
    name: str                           # dataset name written to the manifest
    location: str                       # where it reads from, for error messages
    classes: tuple[str, ...]            # label i -> classes[i]; () when unlabelled
    make: Callable[[], Iterator[Item]]  # starts a fresh pass

    def __iter__(self) -> Iterator[Item]:
        return self.make()

    @property
    def records(self) -> Iterator[Item]:
        """A fresh pass, for callers that want the plain stream (`prepare` also takes the Source itself)."""
        return self.make()


# ---------------------------------------------------------------------------------------------- IDX (MNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Parse an IDX file (gzip or plain, told by its first bytes) into an array of its dims.

    Layout (LeCun's MNIST page): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 dims,
    then the values row-major.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; "
                         f"expected 0000 <dtype code {'/'.join(f'{k:02x}' for k in _IDX_DTYPES)}> <ndim>0)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes, needs {header} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------------------------------- Fashion-MNIST

def _idx_file(root: Path, stem: str) -> Optional[Path]:
    """`stem.gz` or the unpacked `stem` (torchvision keeps both), whichever exists."""
    return next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), None)


def _has_fashion_mnist(root: Path) -> bool:
    return all(_idx_file(root, s) for pair in FASHION_MNIST_FILES.values() for s in pair)


def fashion_mnist_root() -> Path:
    """The folder holding the 4 Fashion-MNIST IDX files: the system copy, the cache, or a fresh download."""
    cached = CACHE_DIR / "FashionMNIST" / "raw"       # where torchvision puts them under root=CACHE_DIR
    for root in (SYSTEM_FASHION_MNIST, cached):
        if _has_fashion_mnist(root):
            return root
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(str(CACHE_DIR), train=True, download=True)   # fetches all 4 files
    except Exception as e:  # no network, mirror down, torchvision missing...
        raise RuntimeError(
            f"Fashion-MNIST not found in {SYSTEM_FASHION_MNIST} or {cached}, and downloading it failed "
            f"({type(e).__name__}: {e}). Install it with `apt-get install dataset-fashion-mnist`, or put the "
            f"4 IDX files (*-idx?-ubyte.gz) in a folder and pass it as root.") from e
    if not _has_fashion_mnist(cached):
        raise RuntimeError(f"torchvision downloaded Fashion-MNIST but the IDX files are not in {cached}")
    return cached


SOURCES: Registry[Callable[..., Source]] = Registry("data source")


def build(name: str, location: Optional[str] = None, **options) -> Source:
    """The registered source `name` reading from `location`, with the options (None = not given) its function
    takes; an option it does not take, or a missing location it needs, is an error naming the choices."""
    fn = SOURCES.get(name)
    params = list(inspect.signature(fn).parameters.values())
    first, rest = params[0], {p.name for p in params[1:]}
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - rest)
    if extra:
        takes = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(rest - {"seed"})) or "no options"
        raise ConfigError(f"data source {name} takes no --{extra[0].replace('_', '-')} (it takes: {takes})")
    if location is None and first.default is inspect.Parameter.empty:
        raise ConfigError(f"`sslab data prepare {name}` needs {first.name.upper()}, where it reads from: "
                          f"sslab data prepare {name} {first.name.upper()} --out DIR")
    return fn(*([] if location is None else [location]), **given)


@SOURCES.register("fashion-mnist")
def fashion_mnist(root: Union[str, Path, None] = None) -> Source:
    """Fashion-MNIST (Xiao et al. 2017): train 60000 and test 10000 images, 28 x 28 x 1, 10 classes."""
    root = Path(root) if root is not None else fashion_mnist_root()
    missing = [s for pair in FASHION_MNIST_FILES.values() for s in pair if not _idx_file(root, s)]
    if missing:
        raise FileNotFoundError(f"{root}: missing Fashion-MNIST IDX files {missing} (.gz or unpacked)")

    def records() -> Iterator[Item]:
        for split, (img_stem, lbl_stem) in FASHION_MNIST_FILES.items():
            img_path, lbl_path = _idx_file(root, img_stem), _idx_file(root, lbl_stem)
            images, labels = read_idx(img_path), read_idx(lbl_path)   # N x 28 x 28 uint8, N uint8
            if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
                raise ValueError(f"{img_path}, {lbl_path}: expected N x H x W uint8 images and N labels, "
                                 f"got {images.shape} {images.dtype} and {labels.shape}")
            for i in range(len(images)):
                yield Record(split, images[i, :, :, None], int(labels[i]), f"{img_path.name}[{i}]")

    return Source("fashion-mnist", str(root), FASHION_MNIST_CLASSES, records)


# ------------------------------------------------------------------------------------------- image folders

def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under root, relative to it, in a stable sorted order; hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(dirpath, name).relative_to(root)


def _hash_fraction(rel: str, seed: int) -> float:
    """A stable number in [0, 1) per relative path: the split does not depend on walk order or the machine."""
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def load_image(path: Union[str, Path], size: int, channels: int) -> np.ndarray:
    """Decode one file -> uint8 size x size x channels: shorter side resized to `size` (bicubic, antialiased
    when shrinking), then centre-cropped. Raises whatever PIL raises on a bad file."""
    from PIL import Image, ImageOps
    mode = {1: "L", 3: "RGB"}[channels]
    with Image.open(path) as img:
        img.draft(mode, (2 * size, 2 * size))   # JPEG only: decode at 1/2..1/8 scale, still >= 2x the target
        img = ImageOps.exif_transpose(img)       # phone photos store their rotation in EXIF
        if img.mode.startswith("I"):             # 16-bit greyscale: PIL's convert clips at 255, so rescale
            img = Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8))
        img = img.convert(mode)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)))   # size x size (L) or size x size x 3
    return arr[:, :, None] if arr.ndim == 2 else arr


INFER_SAMPLE = 200       # images read to infer the folder source's size and channels
MAX_INFERRED_SIZE = 224  # ImageNet's training size: larger images are shrunk to it unless --size asks for more


def _split_roots(src: Path) -> list[tuple[Optional[str], Path]]:
    """(split, root) pairs the folder source reads: `src/train` and `src/test` (or `src/val`) when both exist, else
    (None, src): split by hash."""
    held_out = next((src / d for d in ("test", "val") if (src / d).is_dir()), None)
    return [("train", src / "train"), ("test", held_out)] if (src / "train").is_dir() and held_out else [(None, src)]


def folder_images(src: Union[str, Path]) -> list[Path]:
    """The image files the folder source reads, relative to `src`, in a stable order."""
    src = Path(src)
    return [(root / rel).relative_to(src) for _, root in _split_roots(src) for rel in _walk_images(root)]


def _is_grey(img) -> bool:
    """A grey image: a grey mode, or colour channels that are equal everywhere (grey pictures saved as RGB)."""
    if img.mode in ("1", "L", "LA", "La", "F") or img.mode.startswith("I"):
        return True
    img.draft("RGB", (256, 256))   # JPEG only: decode at reduced scale, still plenty of pixels to see colour
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def infer_folder_format(src: Union[str, Path], size: Optional[int] = None, channels: Optional[int] = None,
                        seed: int = 0) -> tuple[int, int, str]:
    """(size, channels, why) for the folder source: those given, the others inferred from a seeded sample of up to
    `INFER_SAMPLE` of its images; `why` is one line saying what was inferred and why ("" when nothing was).

    channels: 1 when every readable sampled image is grey (`_is_grey`), else 3. size: the median of their shorter
    sides (read from the headers), capped at `MAX_INFERRED_SIZE` and rounded to a multiple of 8.
    """
    from PIL import Image

    src = Path(src)
    if size is not None and channels is not None:
        return size, channels, ""
    files = folder_images(src)
    if not files:
        raise ValueError(f"image folder {src} has no readable images (no {'/'.join(IMAGE_SUFFIXES)} files)")
    sample = random.Random(seed).sample(files, min(INFER_SAMPLE, len(files)))
    sides, colour, bad = [], None, []
    for rel in sample:
        try:
            with Image.open(src / rel) as img:
                side = min(img.size)                        # header only; EXIF rotation keeps the shorter side
                if channels is None and colour is None and not _is_grey(img):
                    colour = rel                            # one colour image decides: no need to decode more
            sides.append(side)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            bad.append(f"{rel}: {type(e).__name__}: {e}")
    if not sides:
        raise ValueError(f"image folder {src}: no readable images ({len(bad)} skipped of {len(sample)} sampled, "
                         f"e.g. {bad[0]}); pass --size and --channels to prepare it anyway")
    said = []
    if size is None:
        median = float(np.median(sides))
        # A multiple of 8: the small CNN and the ResNets halve the image three times, CPC's automatic grid strides
        # by size/8, and ViT patches of 4 or 8 px tile it, so no model crops or pads a ragged edge; 8 is the least.
        size = min(MAX_INFERRED_SIZE, max(8, 8 * int(median / 8 + 0.5)))
        how = (f", capped at {MAX_INFERRED_SIZE}" if median > MAX_INFERRED_SIZE else
               ", rounded to a multiple of 8" if size != median else "")
        said.append(f"{size} px (median shorter side {median:g} of {len(sides)} sampled images{how})")
    if channels is None:
        channels = 3 if colour else 1
        said.append(f"3 channels ({colour} is in colour)" if colour else
                    f"1 channel (all {len(sides)} sampled images are grey)")
    skipped = f"; skipped {len(bad)} unreadable sampled file(s), e.g. {bad[0]}" if bad else ""
    return size, channels, f"[{src.resolve().name or 'images'}] inferred {', '.join(said)}{skipped}"


@SOURCES.register("folder")
def image_folder(src: Union[str, Path], size: Optional[int] = None, channels: Optional[int] = None,
                 test_fraction: float = 0.1, seed: int = 0) -> Source:
    """Every image under a folder, resized and centre-cropped to size x size x channels; class = sub-folder.

    size and channels not given (None) are inferred from a seeded sample of the images and said in one printed
    line (`infer_folder_format`): 1 channel when all are grey, else 3; the median shorter side, capped at 224 and
    rounded to a multiple of 8.
    Splits: `src/train` and `src/test` (or `src/val`, named "test") when both exist; otherwise each file goes to
    test when a hash of its relative path falls below `test_fraction` (stable across runs and machines).
    Class: the first folder under the split root (sorted names -> 0..K-1); None for images at the top.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist or is not a folder")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if (size is not None and size < 1) or not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"need size >= 1 and 0 <= test_fraction <= 1, got size={size}, "
                         f"test_fraction={test_fraction}")
    if size is None or channels is None:
        size, channels, why = infer_folder_format(src, size, channels, seed)
        print(why)
    roots = _split_roots(src)

    # First pass over paths only (no decoding) to fix the class list before any label is emitted.
    classes = tuple(sorted({rel.parts[0] for _, root in roots for rel in _walk_images(root)
                            if len(rel.parts) > 1}))
    label_of = {c: i for i, c in enumerate(classes)}

    def records() -> Iterator[Item]:
        for split, root in roots:
            # Folders are usually sorted by class; shards written in that order would give class-pure batches
            # (few real negatives, skewed BN statistics). Paths (not images) are shuffled once, seeded.
            rels = list(_walk_images(root))
            random.Random(seed).shuffle(rels)
            for rel in rels:
                path = root / rel
                s = split or ("test" if _hash_fraction(path.relative_to(src).as_posix(), seed) < test_fraction
                              else "train")
                label = label_of[rel.parts[0]] if len(rel.parts) > 1 else None
                try:
                    image = load_image(path, size, channels)
                except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
                    yield Skipped(s, str(path), f"{type(e).__name__}: {e}")
                    continue
                yield Record(s, image, label, str(path))

    return Source(src.resolve().name or "images", str(src), classes, records)
