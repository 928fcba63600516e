"""Measuring helpers shared by the benchmarks: the machine, process-tree memory, the timing of a pass."""
from __future__ import annotations

import json
import os
import platform
import threading
import time

import torch

def machine() -> dict:
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import ray

    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(), "platform": platform.platform(),
            "torch": torch.__version__, "ray": ray.__version__, "load_avg_1m": round(os.getloadavg()[0], 2),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def tree_memory(root: int | None = None) -> tuple[int, int, int]:
    """(RSS, PSS, processes): bytes summed over `root` (default: this process) and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    rss = pss = n = 0
    todo = [root or os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        n += 1
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Rss:", "Pss:")):
                        kb = int(line.split()[1]) * 1024
                        rss, pss = (rss + kb, pss) if line.startswith("Rss:") else (rss, pss + kb)
        except OSError:
            continue
    return rss, pss, n


class PeakMemory:
    """Samples `tree_memory` every `every` seconds in a thread while the block runs: .peak_rss, .peak_pss and
    .procs (processes in the tree at the PSS peak)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_rss, self.peak_pss, self.procs, self.samples = every, 0, 0, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            rss, pss, n = tree_memory()
            if pss > self.peak_pss:
                self.peak_pss, self.procs = pss, n
            self.peak_rss = max(self.peak_rss, rss)
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_pass(batches) -> dict:
    """One pass over an iterable of batch dicts (with "index"): totals, the rate after the first batch, and the
    bytes per image of the first batch's uint8 columns (the images or views it carries)."""
    t0 = time.perf_counter()
    n = n_first = 0
    t_first, per_image = None, 0
    for b in batches:
        k = len(b["index"])
        n += k
        if t_first is None:
            t_first, n_first = time.perf_counter(), k
            per_image = sum(v.numel() for v in b.values() if v.dtype == torch.uint8) // max(k, 1)
    total = time.perf_counter() - t0
    steady = (n - n_first) / (t0 + total - t_first) if t_first and n > n_first else float("nan")
    return {"images": n, "seconds": sig(total), "images_per_s": sig(n / total),
            "first_batch_s": sig((t_first or t0) - t0), "steady_images_per_s": sig(steady),
            "bytes_per_image": per_image}


def sig(x: float, digits: int = 4) -> float:
    """A figure rounded to `digits` significant digits (a rate of 0.0004 keeps its meaning)."""
    return float(f"{x:.{digits}g}")


def save_json(result: dict, out: str | None) -> dict:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result
