"""The `sslab` command as a user types it (no Ray here: data preparation, listings, config errors)."""
import json
import os

from conftest import make_image_folder

from sslab.cli import main


def test_prepare_folder_skips_corrupt_and_refuses_overwrite(tmp_path, capsys):
    src = make_image_folder(str(tmp_path / "imgs"), n_per_class=5, mode="RGB")
    with open(os.path.join(src, "a", "broken.png"), "wb") as fh:
        fh.write(b"not a png at all")
    out = str(tmp_path / "shards")
    assert main(["data", "prepare", "folder", src, "--out", out, "--size", "12", "--test-fraction", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert '"num_skipped": 1' in printed and "broken.png" in printed     # the summary names what was skipped
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["origin"].endswith("broken.png")
    assert sum(s["count"] for s in manifest["splits"].values()) == 10
    assert manifest["image_size"] == [12, 12] and manifest["channels"] == 3
    # a second run without --force refuses, naming the flag; with --force it rewrites
    assert main(["data", "prepare", "folder", src, "--out", out, "--size", "12"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["data", "prepare", "folder", src, "--out", out, "--size", "12", "--force"]) == 0


def test_prepare_empty_folder_is_a_clear_error(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert main(["data", "prepare", "folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err


def test_train_with_bad_config_fails_before_ray(tiny_dataset, capsys, monkeypatch):
    import sslab.platform.launch as launch

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run whose config is invalid")

    monkeypatch.setattr(launch, "init_ray", no_ray)
    assert main(["train", "simclr", "--data", tiny_dataset, "recipe.temperature=-1"]) == 2
    assert "recipe.temperature must be > 0" in capsys.readouterr().err
    assert main(["train", "simclr", "--data", tiny_dataset, "--batch-size", "15", "--workers", "2"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["train", "simclr", "--data", "/nonexistent/dir"]) == 2
    assert "sslab data prepare" in capsys.readouterr().err


def test_recipes_and_config_listing(capsys):
    assert main(["recipes"]) == 0
    assert "simclr" in capsys.readouterr().out
    assert main(["config", "simclr", "--data", "/x", "recipe.temperature=0.3"]) == 0
    out = capsys.readouterr().out
    assert "recipe.temperature = 0.3" in out and "NT-Xent temperature" in out


def test_a_registered_data_source_is_a_prepare_choice_with_its_own_options(tmp_path, capsys, monkeypatch):
    import numpy as np

    from sslab.datasets.shards import read_manifest
    from sslab.datasets.sources import SOURCES, Record, Source

    def checkerboards(folder, size: int = 8):
        """Generated checkerboards (a test source)."""
        def records():
            for i in range(12):
                img = np.zeros((size, size, 1), np.uint8)
                img[i % 2::2, ::2] = 200
                yield Record("test" if i >= 10 else "train", img, i % 2, f"{folder}[{i}]")
        return Source("checkerboards", str(folder), ("even", "odd"), records)

    monkeypatch.setitem(SOURCES._entries, "checkerboards", checkerboards)
    out = str(tmp_path / "boards")
    assert main(["data", "prepare", "checkerboards", "here", "--out", out, "--size", "6"]) == 0
    m = read_manifest(out)
    assert (m.count("train"), m.count("test"), m.image_size) == (10, 2, (6, 6))
    capsys.readouterr()
    assert main(["data", "prepare", "checkerboards", "here", "--out", out, "--channels", "3", "--force"]) == 2
    assert "data source checkerboards takes no --channels (it takes: --size)" in capsys.readouterr().err
    assert main(["data", "prepare", "fashion-mnist", "--out", out, "--size", "32"]) == 2
    assert "data source fashion-mnist takes no --size" in capsys.readouterr().err


def test_small_mistakes_get_one_clear_line(tiny_dataset, tmp_path, capsys, monkeypatch):
    import sslab.platform.launch as launch

    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    assert main(["train", "simclr", "--data", tiny_dataset, "--batch-size", "64", "data.limit=40"]) == 2
    assert "engine.batch_size=64 is larger than the 40 training images data.limit=40 leaves" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  epochs: 2\n   batch_size: 3\n")
    assert main(["train", "simclr", "--data", tiny_dataset, "--preset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sslab: error: {bad}: not valid YAML (line 3") and len(err.strip().splitlines()) == 1


def test_asking_for_more_cpus_than_the_machine_has_is_said(monkeypatch, capsys):
    import ray

    from sslab.platform.launch import init_ray

    started = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: started.update(kw))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    init_ray(None, 4.5)
    assert "asks for 4.5 CPUs (Train workers and data tasks) on a 2-core machine" in capsys.readouterr().out
    assert started["num_cpus"] == 6
    init_ray(None, 1.5)
    assert "warning" not in capsys.readouterr().out
