"""The small world the training loop is written against: who am I (rank, world size, device), where my data comes
from, how the model is wrapped for data parallelism, where checkpoints come from and go to, and where metrics are
reported. Two implementations:

- `RayContext`: inside a Ray Train worker (the only place besides launch.py that calls `ray.train`).
- `LocalContext`: in this process, for tests, notebooks and the benchmark baseline; several processes when a
  torch.distributed group is already initialised (torchrun, or a test's gloo group).

Both hand out checkpoints as local directories (`restore()` yields (directory, its path or URI): the newest of the
run's checkpoints that verifies, see checkpoint.py) and take new ones as local directories in `report`, returning
where the checkpoint was persisted.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import shutil
import threading
import time
from typing import Callable, Iterable, Iterator

import torch

from .. import dist
from ..datasets.pipeline import training_batches
from .checkpoint import checkpoints, newest_usable
from .console import Sender, View


def _say(context):
    """Rank 0's lines go to the console (the driver's, for a Ray run); other ranks stay quiet."""
    return context.log if context.rank == 0 else (lambda line: None)


class RayContext:
    """A Ray Train worker: device, dataset shard and process group from Ray Train; checkpoints from
    `ray.train.get_checkpoint()` (a restart or a re-run of the same name), else from `start_from` (a new run
    branching off another run's checkpoint: PBT's exploit)."""

    def __init__(self, run_dir: str = "", start_from: str = "", run_log: str = "", shuffle_rows: int = 0):
        import ray.train
        import ray.train.torch

        self.device = ray.train.torch.get_device()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.run_dir, self.start_from, self._run_log = run_dir, start_from, run_log
        self.shuffle_rows = shuffle_rows
        self._shard = ray.train.get_dataset_shard("train")
        self._ahead: tuple[int, threading.Thread, dict] | None = None     # a pass started early (start_pass)
        # rank 0's lines and progress go to the driver's console (console.py); without one, to this worker's stdout
        self._sender = Sender(run_log) if run_log and self.rank == 0 else None
        self._view = View(tty=False)

    def log(self, line: str) -> None:
        if self._sender:
            self._sender.line(line)
        else:
            print(line, flush=True)

    def progress(self, p: dict) -> None:
        if self._sender:
            self._sender.progress(p)
        else:
            self._view.progress(p)

    def bad_rows(self) -> int:
        """Training rows the stream has skipped so far because they would not decode (counted once each)."""
        import ray

        return ray.get(ray.get_actor(self._run_log).count.remote()) if self._run_log else 0

    def _open(self, size: int) -> Iterator[dict]:
        # on GPU, batches come in page-locked memory, so the loop's non-blocking copy to the device does not hold
        # up the host
        return iter(training_batches(self._shard, size, self.shuffle_rows, pin_memory=self.device.type == "cuda"))

    def start_pass(self, size: int) -> None:
        """Start the next pass now, in a thread that waits for its first batch: its start (Ray Data's planning and
        first block, ~1 s) then overlaps the end of this epoch (monitors, checkpoint) instead of holding the next
        epoch's first step. Every worker does this at its epoch's end; Ray's split starts the pass once all have."""
        box: dict = {}

        def run():
            try:
                box["it"] = self._open(size)
                box["first"] = next(box["it"], None)
            except BaseException as e:  # re-raised in the training thread, where the pass is taken
                box["error"] = e
        thread = threading.Thread(target=run, name="sslab-next-pass", daemon=True)
        thread.start()
        self._ahead = (size, thread, box)

    def _take_ahead(self, size: int) -> Iterator[dict] | None:
        """The pass `start_pass` began, if it was for batches of `size` (one for another size is read to its end
        and dropped: a split's next pass starts only when the last has been read)."""
        if self._ahead is None:
            return None
        started, thread, box = self._ahead
        self._ahead = None
        thread.join()
        if "error" in box:
            raise box["error"]
        if started != size:
            collections.deque(box["it"], maxlen=0)
            return None
        return box["it"] if box["first"] is None else itertools.chain([box["first"]], box["it"])

    def batches(self, size: int) -> Iterator[dict]:
        it = self._take_ahead(size) or self._open(size)
        try:
            yield from it
        finally:  # a pass cut short (steps_per_epoch, a rank out of batches) is read to its end: the next starts clean
            collections.deque(it, maxlen=0)

    def wrap_model(self, recipe: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # the data-parallel wrapper syncs buffers once at start and then only averages gradients; recipe state
        # (queues, banks, centres) is kept identical by the recipes themselves, not re-broadcast every step
        return ray.train.torch.prepare_model(recipe, move_to_device=False,
                                             parallel_strategy_kwargs={"forward_sync_buffers": False})

    @contextlib.contextmanager
    def restore(self) -> Iterator[tuple[str | None, str | None]]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:            # this run's latest, then its older ones (same storage), newest first
            parent, _, name = ckpt.path.rstrip("/").rpartition("/")
            candidates = [ckpt] + self._stored(ckpt.filesystem, parent, older_than=name)
        else:
            # Train's controller learns of a reported checkpoint when it next polls the workers: a node lost right
            # after a report restarts the group without it. This run's own checkpoints in storage come first.
            candidates = self._stored(*self._storage()) if self.run_dir else []
            candidates = candidates or ([ray.train.Checkpoint(self.start_from)] if self.start_from else [])
        with newest_usable(((c.path, c.as_directory) for c in candidates), _say(self)) as found:
            yield found

    def _storage(self):
        """(pyarrow filesystem, path) of the run directory (a local path or a URI such as s3://)."""
        import pyarrow.fs

        if "://" in self.run_dir:
            return pyarrow.fs.FileSystem.from_uri(self.run_dir)
        return pyarrow.fs.LocalFileSystem(), self.run_dir

    @staticmethod
    def _stored(filesystem, run_dir: str, older_than: str = "") -> list:
        """The checkpoint_* directories in `run_dir` (named before `older_than`, if given), newest first."""
        import pyarrow.fs
        import ray.train

        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(run_dir.rstrip("/"), allow_not_found=True))
        found = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory and
                        i.base_name.startswith("checkpoint_") and (not older_than or i.base_name < older_than)),
                       reverse=True)
        return [ray.train.Checkpoint(p, filesystem=filesystem) for p in found]

    def report(self, metrics: dict, checkpoint_dir: str | None) -> str | None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        return ray.train.get_checkpoint().path if checkpoint else None


class LocalContext:
    """The loop in this process. `batches(size)` gives one pass over this rank's share of the training data
    (`sslab.datasets.pipeline.local_batches` makes one from shards); checkpoints go to `run_dir/checkpoint_<time>`
    (the newest `keep` are kept; none are written without a run_dir) and a run resumes from the newest there, else
    from `start_from`. Reports are kept in `self.reports`."""

    def __init__(self, batches: Callable[[int], Iterable[dict]], *, run_dir: str = "", device: str = "cpu",
                 keep: int = 2, start_from: str = ""):
        self.batches = batches
        self.run_dir, self.keep, self.start_from = run_dir, keep, start_from
        self.device = torch.device(device)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.reports: list[dict] = []
        self._view = View()

    def log(self, line: str) -> None:
        self._view.line(line)

    def progress(self, p: dict) -> None:
        self._view.progress(p)

    def bad_rows(self) -> int:
        return 0  # the in-process stream decodes its split up front, and an unreadable row is an error there

    def start_pass(self, size: int) -> None:
        """Nothing to start early: the in-process passes come from memory."""

    def wrap_model(self, recipe: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return recipe
        return torch.nn.parallel.DistributedDataParallel(recipe, broadcast_buffers=False)

    @contextlib.contextmanager
    def restore(self) -> Iterator[tuple[str | None, str | None]]:
        found = checkpoints(self.run_dir)[::-1] if self.run_dir and os.path.isdir(self.run_dir) else []
        found = found or ([self.start_from] if self.start_from else [])
        with newest_usable(((d, lambda d=d: contextlib.nullcontext(d)) for d in found), _say(self)) as usable:
            yield usable

    def report(self, metrics: dict, checkpoint_dir: str | None) -> str | None:
        self.reports.append(dict(metrics))
        if not (checkpoint_dir and self.run_dir):
            return None
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, time.strftime("checkpoint_%Y-%m-%d_%H-%M-%S") +
                            f".{time.time_ns() // 1000 % 1_000_000:06d}")
        shutil.copytree(checkpoint_dir, path)
        for old in checkpoints(self.run_dir)[:-self.keep]:
            shutil.rmtree(old)
        return path
