"""The folder source's size/channel inference and the prepared-data cache (`resolve_data`), on tiny PNGs (no Ray)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from sslab.config import ConfigError
from sslab.datasets import cache, shards, sources
from sslab.datasets.cache import resolve_data
from sslab.datasets.sources import image_folder, infer_folder_format


def save(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)
    return path


def noise(h: int, w: int, c: int = 0, seed: int = 0) -> np.ndarray:
    """Random uint8 pixels: H x W (grey) when c == 0, else H x W x c."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ inference

def test_grey_folder_gives_one_channel_and_says_why(tmp_path, capsys):
    folder = make_image_folder(str(tmp_path / "grey"), n_per_class=3, size=(40, 32), mode="L")
    src = image_folder(folder, test_fraction=0.0)
    assert capsys.readouterr().out == ("[grey] inferred 32 px (median shorter side 32 of 6 sampled images), "
                                       "1 channel (all 6 sampled images are grey)\n")
    assert {r.image.shape for r in src} == {(32, 32, 1)}


def test_rgb_folder_gives_three_channels(tmp_path):
    folder = make_image_folder(str(tmp_path / "rgb"), n_per_class=3, size=(16, 16), mode="RGB")
    size, channels, why = infer_folder_format(folder)
    assert (size, channels) == (16, 3) and "3 channels (" in why and "is in colour)" in why


def test_rgb_files_with_equal_channels_are_grey(tmp_path):
    grey = noise(24, 24)
    save(tmp_path / "a.png", np.stack([grey] * 3, -1))                       # RGB
    save(tmp_path / "b.png", np.dstack([grey] * 3 + [np.full_like(grey, 200)]))   # RGBA
    save(tmp_path / "c.jpg", np.stack([grey] * 3, -1))                       # RGB JPEG, decoded in draft mode
    save(tmp_path / "d.png", noise(24, 24).astype(np.uint16) * 200)          # 16-bit grey (mode I;16)
    assert Image.open(tmp_path / "a.png").mode == "RGB" and Image.open(tmp_path / "c.jpg").mode == "RGB"
    assert infer_folder_format(tmp_path)[:2] == (24, 1)


def test_one_colour_image_makes_the_folder_rgb(tmp_path):
    for i in range(5):
        save(tmp_path / f"{i}.png", noise(16, 16, seed=i))
    colour = np.stack([noise(16, 16)] * 3, -1)
    colour[3, 5, 0] ^= 1                                                      # one pixel off grey
    save(tmp_path / "z.png", colour)
    _, channels, why = infer_folder_format(tmp_path)
    assert channels == 3 and why.endswith("3 channels (z.png is in colour)")


@pytest.mark.parametrize("shorter, size, how", [
    ((16, 24, 40), 24, ""),                                  # the median, already a multiple of 8
    ((20, 28, 28, 300), 32, ", rounded to a multiple of 8"),  # median 28: to the nearest multiple of 8, ties up
    ((27, 27, 27), 24, ", rounded to a multiple of 8"),
    ((3, 4, 5), 8, ", rounded to a multiple of 8"),          # at least 8
    ((260, 300, 500), 224, ", capped at 224"),
])
def test_inferred_size_is_the_median_shorter_side_rounded_and_capped(tmp_path, shorter, size, how):
    for i, s in enumerate(shorter):
        save(tmp_path / f"{i}.png", noise(s, s + 7) if i % 2 else noise(s + 3, s))   # portrait and landscape
    median = np.median(shorter)
    assert infer_folder_format(tmp_path, channels=1) == (
        size, 1, (f"[{tmp_path.name}] inferred {size} px (median shorter side {median:g} of {len(shorter)} "
                  f"sampled images{how})"))


def test_inference_reads_a_seeded_sample_and_skips_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "INFER_SAMPLE", 4)
    for i in range(10):
        save(tmp_path / f"{i}.png", noise(16, 16))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    runs = [infer_folder_format(tmp_path, seed=s)[2] for s in (0, 0, 1, 2, 3, 4)]
    assert runs[0] == runs[1]                                                   # seeded: the same sample
    unlucky = [r for r in runs if "bad.png" in r]                               # those whose sample drew it
    assert 0 < len(unlucky) < len(runs)
    assert all("of 3 sampled images" in r and r.endswith("; skipped 1 unreadable sampled file(s), e.g. bad.png: "
                                                          "UnidentifiedImageError: cannot identify image file "
                                                          f"'{tmp_path / 'bad.png'}'") for r in unlucky)
    assert all("of 4 sampled images" in r for r in runs if r not in unlucky)


def test_explicit_options_win(tmp_path, capsys):
    folder = make_image_folder(str(tmp_path / "grey"), n_per_class=2, size=(20, 20), mode="L")
    src = image_folder(folder, size=12, channels=3, test_fraction=0.0)
    assert capsys.readouterr().out == ""                                        # nothing inferred, nothing said
    assert {r.image.shape for r in src} == {(12, 12, 3)}
    assert {r.image.shape for r in image_folder(folder, size=12, test_fraction=0.0)} == {(12, 12, 1)}
    assert capsys.readouterr().out == "[grey] inferred 1 channel (all 4 sampled images are grey)\n"
    assert infer_folder_format(folder, channels=3)[:2] == (24, 3)


def test_a_folder_without_readable_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no readable images"):
        image_folder(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk: no readable images \(1 skipped of 1 sampled, e\.g\. a\.png.*--size"):
        image_folder(tmp_path / "junk")


def test_folder_signature_defaults_are_inferred():
    import inspect

    params = inspect.signature(image_folder).parameters
    assert params["size"].default is None and params["channels"].default is None


# ------------------------------------------------------------------------------------------------- the cache

@pytest.fixture
def folder(tmp_path):
    return Path(make_image_folder(str(tmp_path / "imgs"), n_per_class=4, size=(20, 16), mode="L"))


@pytest.fixture
def prepare_calls(monkeypatch):
    """Every `shards.prepare` call's output folder, in order."""
    calls, real = [], shards.prepare

    def spy(src, out_dir, **kwargs):
        calls.append(Path(out_dir))
        return real(src, out_dir, **kwargs)

    monkeypatch.setattr(shards, "prepare", spy)
    return calls


def resolve(folder, base, **options):
    """resolve_data's result and the lines it logged."""
    lines = []
    return resolve_data(str(folder), prepared_dir=str(base), log=lines.append, **options), lines


def test_a_prepared_dataset_is_returned_unchanged(tiny_dataset, prepare_calls, tmp_path):
    lines = []
    assert resolve_data(tiny_dataset, prepared_dir=str(tmp_path / "cache"), log=lines.append) == tiny_dataset
    assert resolve_data(tiny_dataset, size=8) == tiny_dataset                  # options only matter for folders
    assert lines == [] and prepare_calls == [] and not (tmp_path / "cache").exists()


def test_a_folder_is_prepared_once_then_reused(folder, tmp_path, prepare_calls):
    base = tmp_path / "cache"
    out, lines = resolve(folder, base)
    entry = Path(out)
    assert entry.parent == base and entry.name.startswith("imgs-") and len(entry.name) == len("imgs-") + 12
    assert lines[0] == f"[sslab] preparing {folder} into {entry} (first use)"
    assert lines[1] == "[imgs] inferred 16 px (median shorter side 16 of 8 sampled images), 1 channel (all 8 " \
                       "sampled images are grey)"
    assert lines[-1].startswith("[imgs] done:")
    m = shards.read_manifest(entry)
    assert m.image_size == (16, 16) and m.channels == 1 and m.classes == ("a", "b")
    assert m.count("train") + m.count("test") == 8
    stamp = (entry / shards.MANIFEST).stat().st_mtime_ns

    again, lines = resolve(folder, base)
    assert again == out and lines == [f"[sslab] using prepared data {entry} (cached for {folder})"]
    assert prepare_calls == [entry] and (entry / shards.MANIFEST).stat().st_mtime_ns == stamp
    assert json.loads((entry / cache.ENTRY_INFO).read_text())["folder"] == str(folder)


@pytest.mark.parametrize("change", ["touch", "rewrite", "add", "remove"])
def test_a_changed_folder_gets_a_new_entry_and_keeps_the_old(folder, tmp_path, prepare_calls, change):
    base = tmp_path / "cache"
    first, _ = resolve(folder, base)
    before = {p.name: p.read_bytes() for p in Path(first).iterdir()}
    victim = folder / "a" / "000.png"
    if change == "touch":                            # same bytes, new mtime
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "rewrite":                        # same mtime, other size
        st = victim.stat()
        save(victim, noise(30, 30))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert victim.stat().st_size != st.st_size
    elif change == "add":
        save(folder / "b" / "new.png", noise(16, 20))
    else:
        victim.unlink()
    second, lines = resolve(folder, base)
    assert second != first and lines[0] == f"[sslab] preparing {folder} into {second} (the folder changed)"
    assert prepare_calls == [Path(first), Path(second)]
    assert {p.name: p.read_bytes() for p in Path(first).iterdir()} == before    # the old entry is untouched
    assert shards.read_manifest(first).count("train") + shards.read_manifest(first).count("test") == 8
    assert resolve(folder, base)[1] == [f"[sslab] using prepared data {second} (cached for {folder})"]


def test_other_settings_get_another_entry(folder, tmp_path, prepare_calls):
    base = tmp_path / "cache"
    inferred, _ = resolve(folder, base)
    small, lines = resolve(folder, base, size=8, channels=3)
    assert small != inferred and lines[0].endswith("(first use with these settings)")
    assert shards.read_manifest(small).image_size == (8, 8) and shards.read_manifest(small).channels == 3
    assert resolve(folder, base, size=None, test_fraction=0.1, seed=0)[0] == inferred   # the defaults, given
    assert resolve(folder, base, seed=1)[0] not in (inferred, small)
    assert len(prepare_calls) == 3
    assert sorted(p.name for p in base.iterdir() if not p.name.startswith(".")) == sorted(
        Path(p).name for p in prepare_calls)


def test_an_interrupted_prepare_never_leaves_a_valid_looking_entry(folder, tmp_path, monkeypatch, prepare_calls):
    base = tmp_path / "cache"
    other, _ = resolve(folder, base, size=8)                  # another entry of the same folder: must survive
    kept = {p.name: p.read_bytes() for p in Path(other).iterdir()}
    real_load, loaded = sources.load_image, []

    def interrupted(*args):
        loaded.append(args)
        if len(loaded) == 3:
            raise KeyboardInterrupt
        return real_load(*args)

    monkeypatch.setattr(sources, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve(folder, base)
    entry = prepare_calls[-1]
    assert not (entry / shards.MANIFEST).exists() and [p.name for p in base.glob(".*preparing*")] == []
    monkeypatch.setattr(sources, "load_image", real_load)

    # a run killed mid-swap: shards in, no manifest; plus the staging folder of a killed prepare
    out, _ = resolve(folder, base)
    (Path(out) / shards.MANIFEST).unlink()
    stale = base / f".{Path(out).name}.preparing-99999"
    stale.mkdir()
    again, lines = resolve(folder, base)
    assert again == out and lines[0] == f"[sslab] preparing {folder} into {out} (the cached copy is incomplete)"
    assert shards.read_manifest(out).count("train") + shards.read_manifest(out).count("test") == 8
    assert not stale.exists() and {p.name: p.read_bytes() for p in Path(other).iterdir()} == kept


def test_cache_location(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLAB_CACHE", str(tmp_path / "env"))
    out = resolve_data(str(folder), log=lambda line: None)
    assert Path(out).parent == tmp_path / "env" / "prepared"
    monkeypatch.delenv("SSLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Path(resolve_data(str(folder), log=lambda line: None)).parent == tmp_path / "home/.cache/sslab/prepared"


def test_a_bad_path_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data path {tmp_path}/nowhere does not exist"):
        resolve_data(str(tmp_path / "nowhere"), prepared_dir=str(tmp_path / "cache"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="file.txt is a file"):
        resolve_data(str(tmp_path / "file.txt"), prepared_dir=str(tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=f"data path {tmp_path}/docs is neither a prepared dataset"):
        resolve_data(str(tmp_path / "docs"), prepared_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="no option 'colour'.*size, channels, test_fraction, seed"):
        resolve_data(str(tmp_path / "docs"), colour=True)
    assert not (tmp_path / "cache").exists()
