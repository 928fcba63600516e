"""`sslab bench data|train --smoke` run end to end on a local Ray and write well-formed JSON; the measuring
helpers measure what they say. (Throughput itself is a benchmark figure, never asserted here.)"""
import json
import math
import os
import time

import pytest
import torch

from sslab import cli
from sslab.datasets.shards import load_split
from sslab.datasets.views import two_views
from sslab.bench.data import PerImageViews
from sslab.bench.measure import time_pass, tree_memory


PEAK = """
import time, torch
from sslab.bench.measure import PeakMemory, tree_memory
rss, pss, n = tree_memory()
assert n >= 1 and 0 < pss <= rss
with PeakMemory(every=0.01) as peak:
    block = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB touched while sampling
    block.add_(1)
    taken, deadline = peak.samples, time.time() + 30
    while peak.samples < taken + 2 and time.time() < deadline:  # two samples with the block alive
        time.sleep(0.01)
print(peak.peak_rss - rss, peak.procs)
"""


def test_tree_memory_counts_this_process_and_its_children():
    # in a fresh process: this one's tree holds whatever earlier tests left running (Ray's workers), whose memory
    # moves on its own while the peak is sampled
    import subprocess
    import sys

    rss, pss, n = tree_memory()
    assert n >= 1 and 0 < pss <= rss
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, procs = map(int, out.stdout.split())
    assert grew >= 48 << 20 and procs >= 1


def test_time_pass_counts_every_image():
    def slow():  # each batch takes >= 50 ms to arrive
        for k in (4, 4, 2):
            time.sleep(0.05)
            yield {"index": torch.arange(k)}
    r = time_pass(slow())
    assert r["images"] == 10 and r["seconds"] >= 0.15 and r["first_batch_s"] >= 0.05
    assert 0 < r["steady_images_per_s"] <= 6 / 0.1 + 1e-6   # 6 images after the first batch, in >= 0.1 s


def test_per_image_baseline_makes_the_same_columns(tiny_dataset):
    from sslab.datasets.shards import read_manifest
    import pyarrow.parquet as pq

    m = read_manifest(tiny_dataset)
    t = pq.read_table(m.files("train")[0])
    ds = PerImageViews(t.column("image").to_pylist(), t.column("label").to_pylist(), 1, two_views(12))
    item = ds[3]
    images, labels, _ = load_split(tiny_dataset, "train", 4)
    assert set(item) == {"view0", "view1", "index", "label"} and item["label"] == labels[3]
    assert item["view0"].shape == (1, 12, 12) and item["view0"].dtype == torch.uint8


@pytest.mark.ray
def test_bench_data_smoke(local_ray, tmp_path):
    out = str(tmp_path / "data.json")
    assert cli.main(["bench", "data", "--smoke", "--out", out]) == 0
    r = json.load(open(out))
    assert r["benchmark"] == "data" and r["smoke"] and r["machine"]["cpus"] >= 1
    names = ("ray_data", "ray_data_decode", "dataloader_batched", "dataloader_decode", "dataloader_per_image")
    assert [(x["loader"], x["cpus"]) for x in r["rows"]] == [(name, c) for c in (1, 2) for name in names]
    for row in r["rows"]:  # every loader delivers every image of the same shard files
        assert row["images"] == r["images"] == 64 and row["images_per_s"] > 0
        # two 16x16 grey views per image, or the 16x16 image once (+ nothing else uint8)
        assert row["bytes_per_image"] == (256 if "decode" in row["loader"] else 512), row
    for c in ("1", "2"):
        assert set(r["ratios"][c]) == {"ray_vs_same_work_dataloader", "ray_decode_vs_same_work_dataloader",
                                       "ray_vs_per_image_dataloader", "ray_first_pass_vs_same_work_dataloader",
                                       "batched_vs_per_image_dataloader", "view_bytes_vs_image_bytes"}
        assert r["ratios"][c]["view_bytes_vs_image_bytes"] == 2
    mem = r["memory"]
    assert [run["scale"] for run in mem["runs"]] == [1, 3] and [run["images"] for run in mem["runs"]] == [32, 96]
    assert all(run["peak_pss_mb"] > 0 and run["peak_rss_mb"] >= run["peak_pss_mb"] for run in mem["runs"])
    assert isinstance(r["goal"]["met"], bool)


@pytest.mark.ray
def test_bench_train_smoke(local_ray, tmp_path):
    out = str(tmp_path / "train.json")
    assert cli.main(["bench", "train", "--smoke", "--out", out]) == 0
    r = json.load(open(out))
    assert r["benchmark"] == "train" and r["workers"] == 1 and r["batch"] == 16
    assert [rep["epoch"] for rep in r["reports"]] == [1, 2] and [rep["step"] for rep in r["reports"]] == [4, 8]
    assert len(r["bare_before_after_steps_per_s"]) == 2
    for rep in r["reports"]:  # the steady rate leaves out each epoch's first step: never below the whole epoch's
        assert rep["steady_images_per_s"] >= rep["images_per_s"] > 0 and 0 <= rep["data_wait_frac"] < 1
    for key in ("engine_steps_per_s", "engine_in_epoch_steps_per_s", "engine_with_reports_steps_per_s",
                "bare_steps_per_s", "ratio", "ratio_in_epoch", "ratio_with_reports"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["ratio"] == pytest.approx(r["engine_steps_per_s"] / r["bare_steps_per_s"], rel=1e-2)
    assert os.path.isfile(out) and isinstance(r["goal"]["met"], bool)
