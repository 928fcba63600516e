"""Prepared-data cache: train on a raw image folder without running `sslab data prepare` first.

`resolve_data(path)` returns a prepared dataset for `path`: the path itself when it is one, else a cache entry the
folder source (`sources.image_folder`) prepared from it, made on first use and reused while the folder and the
settings stay the same. An entry is `<base>/<folder name>-<key[:12]>`, with `<base>` the `prepared_dir` argument,
else `$SSLAB_CACHE/prepared`, else `~/.cache/sslab/prepared`; the key hashes the folder's absolute path, every image
file's relative path, size and mtime, the folder source's settings (defaults filled in) and the format versions.
An entry counts only once its manifest and shards are all in place (`shards.prepare` builds it in a staging folder
and swaps it in whole); one process at a time prepares an entry (a `.<entry>.lock` file beside it), the others wait.
Old entries are never deleted automatically: remove `<base>` (or one entry folder) to clear them.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import ConfigError
from . import shards, sources

CACHE_VERSION = 1   # bump when the folder source makes different images from the same files and settings
ENTRY_INFO = "sslab-cache.json"   # in each entry, beside the manifest: the folder and settings it was made from


def cache_base(prepared_dir: str | None = None) -> Path:
    """The folder holding the cache entries (see the module docstring)."""
    if prepared_dir:
        return Path(prepared_dir).expanduser()
    root = os.environ.get("SSLAB_CACHE") or Path.home() / ".cache" / "sslab"
    return Path(root).expanduser() / "prepared"


def _settings(options: dict) -> dict:
    """The folder source's options with its defaults filled in (None = not given), so that leaving an option out
    and giving its default share an entry; an option it does not take is an error naming those it does."""
    params = list(inspect.signature(sources.image_folder).parameters.values())[1:]
    extra = sorted({k for k, v in options.items() if v is not None} - {p.name for p in params})
    if extra:
        raise ConfigError(f"preparing an image folder takes no option {extra[0]!r} "
                          f"(it takes: {', '.join(p.name for p in params)})")
    return {p.name: p.default if options.get(p.name) is None else options[p.name] for p in params}


def _key(folder: Path, files: list[Path], settings: dict) -> str:
    """sha256 of the folder's path, its image files (relative path, size, mtime) and the settings."""
    h = hashlib.sha256(json.dumps({"folder": str(folder), "settings": settings, "cache": CACHE_VERSION,
                                   "format": shards.FORMAT_VERSION}, sort_keys=True).encode())
    for rel in files:
        try:
            st = (folder / rel).stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:         # a dangling link: the source skips it; it still belongs to the listing
            stamp = "unreadable"
        h.update(f"\n{rel.as_posix()}\0{stamp}".encode())
    return h.hexdigest()


def _complete(entry: Path) -> bool:
    """Whether `entry` holds a whole prepared dataset (its manifest and every shard it lists)."""
    try:
        shards.read_manifest(entry)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _why_new(entry: Path, folder: Path, settings: dict) -> str:
    """Why `folder` is prepared now, from the info files of the entries beside `entry` made for the same name."""
    if entry.exists():
        return "the cached copy is incomplete"
    seen = []
    for other in entry.parent.glob(f"{glob.escape(entry.name.rsplit('-', 1)[0])}-*"):   # <folder name>-<key>
        try:
            seen.append(json.loads((other / ENTRY_INFO).read_text()))
        except (OSError, ValueError):
            continue
    mine = [s for s in seen if isinstance(s, dict) and s.get("folder") == str(folder)]
    if any(s.get("settings") == settings for s in mine):
        return "the folder changed"
    return "first use with these settings" if mine else "first use"


@contextmanager
def _locked(entry: Path, folder: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on `entry` (a lock file beside it): one process prepares it, the others wait."""
    with open(entry.parent / f".{entry.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[sslab] waiting for another process preparing {folder} into {entry}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(folder: Path, entry: Path, settings: dict, log: Callable[[str], None]) -> None:
    """Prepare `folder` into the cache entry `entry`; the caller holds the entry's lock."""
    log(f"[sslab] preparing {folder} into {entry} ({_why_new(entry, folder, settings)})")
    # What a killed run left of this entry (a part swapped in, or the staging folder `shards.prepare` names
    # `.<entry>.preparing-<pid>`): only this entry's own paths, named by its key, so no other entry's files; under
    # the lock, so no live prepare's.
    for stale in [entry, *entry.parent.glob(f".{glob.escape(entry.name)}.preparing-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    size, channels, why = sources.infer_folder_format(folder, settings["size"], settings["channels"], settings["seed"])
    if why:
        log(why)
    shards.prepare(sources.image_folder(folder, **{**settings, "size": size, "channels": channels}), entry,
                   progress=log)
    (entry / ENTRY_INFO).write_text(json.dumps({"folder": str(folder), "settings": settings}, indent=1))


def resolve_data(path: str, prepared_dir: str | None = None, log: Callable[[str], None] = print,
                 **prepare_options) -> str:
    """A prepared dataset for `path`: `path` unchanged when it holds sslab's manifest (a local path or a URI), else,
    for a local folder of images, its cache entry, prepared first when missing or stale (see the module docstring).

    `prepare_options` are the folder source's (size, channels, test_fraction, seed; None = not given, so size and
    channels are inferred); a prepared dataset ignores them. For a folder, logs "[sslab] using prepared data DIR
    (cached for FOLDER)", or "[sslab] preparing FOLDER into DIR (first use|the folder changed|...)" followed by
    the prepare's own lines. Raises FileNotFoundError or ConfigError naming `path` when it is neither.
    """
    path, settings = os.fspath(path), _settings(prepare_options)
    if "://" in path:
        shards.read_manifest(path)          # raises FileNotFoundError naming the path when it is not prepared
        return path
    folder = Path(path).expanduser()
    if (folder / shards.MANIFEST).is_file():
        return path
    if not folder.is_dir():
        raise FileNotFoundError((f"data path {path} does not exist" if not folder.exists() else
                                 f"data path {path} is a file") + ": give a folder of images or a dataset made by "
                                "`sslab data prepare`")
    folder = folder.resolve()
    files = sources.folder_images(folder)
    if not files:
        raise ConfigError(f"data path {path} is neither a prepared dataset (no {shards.MANIFEST}) nor a folder of "
                          f"images (no {'/'.join(sources.IMAGE_SUFFIXES)} files under it)")
    entry = cache_base(prepared_dir) / f"{folder.name or 'images'}-{_key(folder, files, settings)[:12]}"
    if not _complete(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        with _locked(entry, folder, log):
            if not _complete(entry):        # else another process prepared it while this one waited
                _prepare(folder, entry, settings, log)
                return str(entry)
    log(f"[sslab] using prepared data {entry} (cached for {folder})")
    return str(entry)


DATA_HELP = ("a folder of images (prepared into a cache on first use: size and channels inferred) or a dataset made "
             "by `sslab data prepare`")


def add_data_arguments(parser, data_help: str = DATA_HELP) -> None:
    """--data and --prepared-dir, for the commands that take data (train, tune, eval, embed)."""
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--prepared-dir", help="where a folder's prepared copy is cached (default "
                        "$SSLAB_CACHE/prepared or ~/.cache/sslab/prepared)")


def resolve_data_argument(args) -> None:
    """Replace args.data, when given, by its prepared dataset (see `resolve_data`)."""
    if getattr(args, "data", None):
        args.data = resolve_data(args.data, getattr(args, "prepared_dir", None))
