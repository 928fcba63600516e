"""Each fault and bad input of "What sslab survives", through the CLI as a user meets it: seconds to sslab's
message, the message, and what was lost. Runs on a copy of a prepared dataset; short runs (4 steps an epoch).

    .venv/bin/python benchmarks/faults.py --data data/fashion-mnist       # ~6 minutes on 2 cores

Prints one JSON line per case and writes them all to WORK/faults.json (WORK: --work, default /tmp/sslab-faults,
emptied first)."""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

SSLAB = [sys.executable, "-m", "sslab.cli"]
SHORT = ["engine.steps_per_epoch=4", "engine.knn_every=0", "engine.diagnostics=0", "data.limit=2048",
         "--batch-size", "128"]


class Payload:
    """What a planted pickle does: run a command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Faults:
    def __init__(self, data: str, work: str):
        self.data, self.work, self.rows = os.path.abspath(data), work, []
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        self.env = os.environ | {"PYTHONPATH": os.getcwd()}

    def sslab(self, *args, timeout=600):
        t = time.monotonic()
        p = subprocess.run(SSLAB + list(args), cwd=self.work, capture_output=True, text=True, timeout=timeout,
                           env=self.env)
        return time.monotonic() - t, p.returncode, p.stdout + p.stderr

    def train(self, name, *extra, recipe="simclr", data=None, epochs=2):
        return self.sslab("train", recipe, "--data", data or self.data, "--storage", "runs", "--name", name,
                          "--epochs", str(epochs), *SHORT, *extra)

    def record(self, case, result, lost="nothing", grep=None):
        seconds, rc, out = result
        lines = [line for line in out.splitlines() if line.strip() and (grep is None or grep in line)]
        self.rows.append({"case": case, "seconds": round(seconds, 1), "exit": rc,
                          "message": lines[-1][:400] if lines else "", "lost": lost})
        print(json.dumps(self.rows[-1]), flush=True)

    def copy(self, name):
        dst = os.path.join(self.work, name)
        shutil.copytree(self.data, dst)
        return dst

    def checkpoints(self, run):
        return sorted(d for d in glob.glob(os.path.join(self.work, "runs", run, "checkpoint_*")) if os.path.isdir(d))

    def edit_manifest(self, data, **fields):
        path = os.path.join(data, "manifest.json")
        m = json.load(open(path))
        m.update(fields)
        json.dump(m, open(path, "w"))
        return m


def checkpoint_cases(f: Faults):
    f.train("planted")
    newest = f.checkpoints("planted")[-1]
    state, marker = os.path.join(newest, "state.pt"), os.path.join(f.work, "payload-ran")
    torch.save({"recipe": {}, "payload": Payload(marker)}, state)
    index = json.load(open(os.path.join(newest, "checkpoint.json")))       # made to match: only loading can stop it
    index["files"]["state.pt"] = {"bytes": os.path.getsize(state),
                                  "sha256": hashlib.sha256(open(state, "rb").read()).hexdigest()}
    json.dump(index, open(os.path.join(newest, "checkpoint.json"), "w"))
    f.record("planted pickle: sslab eval CHECKPOINT", f.sslab("eval", newest, "--protocol", "knn"),
             f"payload ran: {os.path.exists(marker)}")
    f.record("planted pickle: the same train command resumes", f.train("planted", epochs=3),
             f"payload ran: {os.path.exists(marker)}")

    f.train("cut")
    with open(os.path.join(f.checkpoints("cut")[-1], "state.pt"), "r+b") as fh:
        fh.truncate(1000)
    f.record("newest checkpoint truncated: sslab eval RUN_DIR", f.sslab("eval", "runs/cut", "--protocol", "knn"),
             grep="skipped")
    f.record("newest checkpoint truncated: resume", f.train("cut", epochs=3), "the truncated epoch", grep="skipped")
    os.makedirs(os.path.join(f.work, "runs", "cut", "checkpoint_2099-01-01_00-00-00.000000"))
    f.record("half-written checkpoint folder: sslab eval RUN_DIR", f.sslab("eval", "runs/cut", "--protocol", "knn"),
             grep="skipped")


def data_cases(f: Faults):
    def digest(d):
        return hashlib.sha256(b"".join(open(p, "rb").read() for p in sorted(glob.glob(d + "/*")))).hexdigest()

    good = f.copy("force")
    open(os.path.join(good, "my_sales.parquet"), "w").write("the user's own file")
    before = digest(good)
    os.makedirs(os.path.join(f.work, "empty"))
    f.record("data prepare --force from an empty folder over a good dataset",
             f.sslab("data", "prepare", "folder", "empty", "--out", good, "--force"),
             f"dataset and my_sales.parquet unchanged: {digest(good) == before}")

    d = f.copy("flipped")
    shard = sorted(glob.glob(d + "/train-*.parquet"))[2]
    raw = bytearray(open(shard, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(raw))
    f.record("a shard with one byte changed", f.train("flipped", data=d))
    d = f.copy("random")
    open(sorted(glob.glob(d + "/train-*.parquet"))[0], "wb").write(os.urandom(1 << 20))
    f.record("random bytes instead of a shard", f.train("random", data=d))
    d = f.copy("truncated")
    shard = sorted(glob.glob(d + "/train-*.parquet"))[0]
    os.truncate(shard, os.path.getsize(shard) // 2)
    f.record("a truncated shard", f.train("truncated", data=d))
    d = f.copy("channels")
    f.edit_manifest(d, channels=3, mean=[0.5] * 3, std=[0.2] * 3)
    f.record("the manifest declares 3 channels for grey images", f.train("channels", data=d))
    d = f.copy("size")
    f.edit_manifest(d, image_size=[32, 32])
    f.record("the manifest declares 32 px for 28 px images", f.train("size", data=d))

    d = f.copy("garbage")                  # row 5000: not among the images checked before training
    shard = sorted(glob.glob(d + "/train-*.parquet"))[0]
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[5000] = b"\x89PNG but not really"
    pq.write_table(table.set_column(0, pa.field("image", pa.binary()), pa.array(images, pa.binary())), shard)
    m = json.load(open(os.path.join(d, "manifest.json")))
    for entry in m["splits"]["train"]["files"]:
        if entry["path"] == os.path.basename(shard):
            entry["sha256"] = hashlib.sha256(open(shard, "rb").read()).hexdigest()
    f.edit_manifest(d, splits=m["splits"])
    f.record("a PNG row that does not decode", f.sslab(
        "train", "simclr", "--data", d, "--storage", "runs", "--name", "garbage", "--epochs", "1",
        "engine.steps_per_epoch=4", "engine.knn_every=0", "engine.diagnostics=0", "--batch-size", "128"),
        "that row", grep="skipped")


def run_cases(f: Faults):
    f.record("SGD at lr 1e6", f.sslab("train", "simclr", "--data", f.data, "--storage", "runs", "--name", "sgd",
                                      "--epochs", "2", "engine.optimizer=sgd", "engine.base_lr=1e6",
                                      "engine.knn_every=0", "data.limit=4096"))
    f.record("--name ../x", f.train("../x"), f"anything outside runs/: {os.path.exists(f.work + '/x')}")
    f.record("resume a simclr run name with byol", f.train("cut", recipe="byol", epochs=4))
    open(os.path.join(f.work, "bad.yaml"), "w").write("engine:\n  epochs: [1,\n")
    f.record("a malformed YAML preset", f.train("yaml", "--preset", "bad.yaml"))
    f.record("data.limit=500 with batch 1024", f.sslab("train", "simclr", "--data", f.data, "--storage", "runs",
                                                       "--name", "limit", "data.limit=500", "--batch-size", "1024"))

    busy = subprocess.Popen(SSLAB + ["train", "simclr", "--data", f.data, "--storage", "runs", "--name", "busy",
                                     "--epochs", "1", "engine.knn_every=0", "data.limit=8192"],
                            cwd=f.work, env=f.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not glob.glob(os.path.join(f.work, "runs/busy/tensorboard/*")):
        time.sleep(0.2)
    time.sleep(5)                          # training
    f.record("a second sslab train of a run already going", f.train("busy", epochs=1))

    ps = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split()[2:]
    children = {}
    for pid, ppid in zip(ps[::2], ps[1::2]):
        children.setdefault(int(ppid), []).append(int(pid))
    ray, todo = [], [busy.pid]             # every process the driver started, and theirs: its whole Ray
    while todo:
        kids = children.get(todo.pop(), [])
        ray += kids
        todo += kids

    def alive():                           # a process that has exited but is not collected yet counts as gone
        def state(pid):
            try:
                return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                return "gone"
        return [pid for pid in ray if state(pid) not in ("gone", "Z")]
    os.kill(busy.pid, signal.SIGKILL)      # not collected yet: a zombie holds the run's lock
    t = time.monotonic()
    while alive() and time.monotonic() - t < 300:
        time.sleep(0.2)
    f.rows.append({"case": "the driver killed (SIGKILL): every process it started gone after", "exit": -9,
                   "seconds": round(time.monotonic() - t, 1), "message": f"{len(ray)} processes before, {len(alive())} after",
                   "lost": "the epoch in progress"})
    print(json.dumps(f.rows[-1]), flush=True)
    f.record("the killed run, the same command again", f.train("busy", epochs=1), grep="taking over")
    busy.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--work", default="/tmp/sslab-faults")
    args = ap.parse_args()
    f = Faults(args.data, args.work)
    for cases in (checkpoint_cases, data_cases, run_cases):
        cases(f)
    json.dump(f.rows, open(os.path.join(args.work, "faults.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
