"""benchmarks/fmnist_folder.py: a prepared dataset written out as an image folder, which `sslab data prepare folder`
turns back into the same images (at their own size) or into the 32 px RGB set the GPU benchmarks train on."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from sslab.datasets import shards, sources
from sslab.datasets.shards import load_split

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fmnist_folder.py"


def test_the_folder_prepares_back_to_the_same_images(tiny_dataset, tmp_path):
    folder = tmp_path / "folder"
    subprocess.run([sys.executable, str(SCRIPT), "--data", tiny_dataset, "--out", str(folder)], check=True)
    images, labels, _ = load_split(tiny_dataset, "train")
    assert len(list((folder / "train").rglob("*.png"))) == len(images)
    src = sources.image_folder(str(folder), size=16, channels=1)
    shards.prepare(src.records, str(tmp_path / "again"), name="again", classes=src.classes, progress=lambda s: None)
    again, again_labels, _ = load_split(str(tmp_path / "again"), "train")
    key = lambda a: sorted(x.tobytes() + bytes([y]) for x, y in zip(a[0], a[1].tolist()))
    assert key((again, again_labels)) == key((images, labels))     # the same pixels, each under its class
    rgb32 = sources.image_folder(str(folder), size=32, channels=3)
    shards.prepare(rgb32.records, str(tmp_path / "rgb32"), name="rgb32", classes=rgb32.classes,
                   progress=lambda s: None)
    big, _, _ = load_split(str(tmp_path / "rgb32"), "train")
    assert big.shape[1:] == (3, 32, 32) and big.shape[0] == len(images)
    assert np.array_equal(big[:, 0], big[:, 2])                    # grey, repeated on the three channels


def test_it_refuses_an_existing_folder(tiny_dataset, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    run = subprocess.run([sys.executable, str(SCRIPT), "--data", tiny_dataset, "--out", str(tmp_path / "mine")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "exists" in run.stderr
    assert (tmp_path / "mine" / "keep.txt").read_text() == "a user's file"
