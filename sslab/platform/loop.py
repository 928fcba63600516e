"""The training loop, written once: `train_step` (what every step does, for the engine, the benchmark baseline and
the tests alike) and `Trainer`, whose `run` reads top to bottom:

    setup -> resume -> for each epoch: before_epoch hooks -> steps -> callbacks (monitors, guards, loggers)
                                       -> checkpoint + report

The loop is written against a context (context.py: Ray Train's worker, or in-process) for rank, device, data,
checkpoints and reports, knows a recipe only through its protocol (recipes/protocol.py), and leaves whatever
watches a run to callbacks (callbacks.py).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .. import dist
from ..datasets.shards import read_manifest
from ..datasets.views import make_views, normalize, view_key
from ..recipes import registry
from ..recipes.protocol import StepOut
from ..schedules import Schedule
from .checkpoint import load_state, save_state
from .optim import build_optimizer
from .spec import RunSpec, build_recipe, steps_per_epoch


class TrainingStopped(RuntimeError):
    """Raised when the run must not go on: a non-finite loss or a collapsed representation."""


class NonFiniteLoss(ArithmeticError):
    """A step's loss was NaN or infinite on some rank (every rank raises it, so all stop together)."""


# ---- one step ------------------------------------------------------------------------------------------------


@dataclass
class StepParts:
    """Everything one training step needs."""
    model: torch.nn.Module        # what forward runs on: the recipe, maybe wrapped for data parallelism or compiled
    recipe: torch.nn.Module       # the bare recipe: its hooks and parameters
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    clip_grad: float = 0.0        # max gradient norm; 0 = no clipping
    amp: bool = False             # bf16 autocast (on GPU)


def train_step(parts: StepParts, views: list[torch.Tensor], batch: dict[str, torch.Tensor], step: int) -> StepOut:
    """One optimisation step at global step `step`: set the schedule's learning rate and weight decay, forward under
    autocast, check the loss is finite on every rank, backward, the recipe's hooks around clipping and the optimizer
    step. `views` are normalised float tensors on the device; `batch` holds "index" and "label"."""
    schedule, optimizer, recipe = parts.schedule, parts.optimizer, parts.recipe
    progress = schedule.progress(step)
    lr, wd = schedule.lr(step), schedule.wd(step)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if g["decay"]:  # groups without decay (biases, norms) stay without
            g["weight_decay"] = wd
    device = views[0].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=parts.amp and device.type == "cuda"):
        out = parts.model(views, batch, progress)
    if not dist.all_true(bool(torch.isfinite(out.loss.detach())), device):  # all ranks stop together
        raise NonFiniteLoss(f"{out.loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    recipe.before_optimizer_step(progress)
    if parts.clip_grad:
        torch.nn.utils.clip_grad_norm_(recipe.parameters(), parts.clip_grad)
    optimizer.step()
    recipe.after_step(progress)
    return out


def whole_batches(batches: Iterable[dict], size: int, device) -> Iterator[dict]:
    """The worker's stream as steps take it: each whole local batch of `size` rows as it came. Every rank stops at
    the first batch some rank lacks, so all take the same number (a rank stepping alone would hang a collective).
    Closing this generator closes the stream's (the Ray context then reads its pass to the end)."""
    it = iter(batches)
    try:
        while True:
            raw = next(it, None)
            if not dist.all_true(raw is not None and raw["index"].shape[0] == size, device):
                return
            yield raw
    finally:
        if hasattr(it, "close"):  # a generator: the context's pass
            it.close()


# ---- the loop --------------------------------------------------------------------------------------------------


@dataclass
class EpochMeter:
    """What an epoch has done so far, for progress lines and the epoch's metrics."""
    t0: float                     # perf_counter at the epoch's start
    steps: int = 0
    images: int = 0               # all ranks together
    loss_sum: float = 0.0
    t1: float | None = None       # after the first step: the steady rate leaves the stream's start-up out
    images1: int = 0
    waited: float = 0.0           # seconds blocked on the stream after the first step

    def rate(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.t0)

    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.steps)


class Trainer:
    """One worker's part of a run: `Trainer(spec, context, callbacks).run()`.

    `stop_after_epoch` ends this run early while the schedules still span `spec.engine.epochs` (PBT trains in such
    segments); callbacks may end it too (`request_stop`), in which case the epoch is reported without a checkpoint
    and `TrainingStopped` names the last good one.
    """

    def __init__(self, spec: RunSpec, context, callbacks=(), *, stop_after_epoch: int = 0):
        self.spec, self.ctx, self.callbacks = spec, context, list(callbacks)
        self.last_epoch = min(stop_after_epoch or spec.engine.epochs, spec.engine.epochs)
        self.good = None          # (path, epochs done, step) of the checkpoint a resume would start from
        self._stop: tuple[str, str] | None = None

    def log(self, line: str) -> None:
        """sslab's own console lines: rank 0 prints them."""
        if self.ctx.rank == 0:
            self.ctx.log(line)

    def request_stop(self, what: str, value: str) -> None:
        """Called by a guard during `on_epoch_end`: the epoch is reported, not checkpointed, and the run stops."""
        self._stop = (what, value)

    def stop_now(self, what: str, value: str) -> None:
        """Called by a guard during a step (every rank alike): the run stops at once, naming the last good
        checkpoint."""
        raise TrainingStopped(self.stop_message(what, value))

    def run(self) -> None:
        self.setup()
        self.resume()
        for cb in self.callbacks:
            cb.on_run_start(self)
        try:
            for epoch in range(self.start_epoch, self.last_epoch):
                self.epoch = epoch
                self.before_epoch(epoch)
                metrics = self.train_epoch(epoch)
                if epoch + 1 < self.last_epoch:  # the next epoch's stream starts during the callbacks and checkpoint
                    self.ctx.start_pass(self.local_batch)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, metrics)
                self.checkpoint_and_report(epoch, metrics)
        finally:  # a stopped run too: TensorBoard's last events are flushed (and uploaded)
            for cb in self.callbacks:
                cb.on_run_end(self)

    # -- setup: data, recipe, optimizer, schedule
    def setup(self) -> None:
        spec, eng, ctx = self.spec, self.spec.engine, self.ctx
        torch.manual_seed(eng.seed)
        self.manifest = read_manifest(spec.data.path)
        self.image_size = spec.data.crop_size or self.manifest.image_size[0]
        self.viewset = registry.get(spec.recipe_name).views(spec.recipe, spec.data, self.image_size)
        self.columns = self.viewset.columns
        self.local_batch = eng.batch_size // ctx.world_size
        self.steps_per_epoch = steps_per_epoch(spec, self.manifest.count("train"))
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {eng.batch_size} is larger than the training set")
        on_gpu = ctx.device.type == "cuda"
        self.channels_last = eng.channels_last and on_gpu
        self.mean = torch.tensor(self.manifest.mean, device=ctx.device).view(1, -1, 1, 1)
        self.std = torch.tensor(self.manifest.std, device=ctx.device).view(1, -1, 1, 1)

        recipe = build_recipe(spec, self.manifest, self.image_size).to(ctx.device)
        if on_gpu and ctx.world_size > 1 and recipe.sync_bn:  # SyncBatchNorm raises on CPU tensors: GPU only
            recipe = torch.nn.SyncBatchNorm.convert_sync_batchnorm(recipe)
        if self.channels_last:
            recipe = recipe.to(memory_format=torch.channels_last)
        self.recipe = recipe
        peak_lr = eng.base_lr * eng.batch_size / 256
        self.optimizer = build_optimizer(eng.optimizer, recipe, peak_lr, eng.momentum, eng.weight_decay,
                                         recipe.optimizer_groups())
        total = self.steps_per_epoch * eng.epochs
        self.schedule = Schedule(total, int(eng.warmup_epochs * self.steps_per_epoch), peak_lr, eng.final_lr_ratio,
                                 eng.weight_decay, eng.weight_decay_end)

    # -- resume: the latest checkpoint of this run (or the one it branches from), then the parallel wrapper
    def resume(self) -> None:
        self.start_epoch, self.step = 0, 0
        with self.ctx.restore() as (directory, path):
            if directory is not None:
                state = load_state(directory, self.ctx.device)
                self.recipe.load_state_dict(state["recipe"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.start_epoch, self.step = state["epoch"] + 1, state["global_step"]
                self.good = (path, self.start_epoch, self.step)
                self.log(f"[sslab] resumed from checkpoint after epoch {state['epoch'] + 1} (step {self.step})")
        model = self.ctx.wrap_model(self.recipe)
        if self.spec.engine.compile:
            model = torch.compile(model)
        self.parts = StepParts(model, self.recipe, self.optimizer, self.schedule, self.spec.engine.clip_grad,
                               self.spec.engine.amp)

    # -- the data stage: uint8 batches from the context -> (uint8 views ->) normalised views on the device
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x.to(self.ctx.device, non_blocking=True), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def stream(self, epoch: int) -> Iterator[tuple[list, dict, dict]]:
        """One pass over this worker's training stream, whole local batches only, as (views, batch, shown): the
        normalised views, "index" and "label" on the device, and the uint8 views with "index" and "label". A stream
        of decoded images (`data.augment=worker`) gets its views here, on the device, keyed by (seed, epoch) and
        image index: a resumed epoch makes the same views of the same images."""
        device, key = self.ctx.device, view_key(self.spec.engine.seed, epoch)
        batches = whole_batches(self.ctx.batches(self.local_batch), self.local_batch, device)
        try:
            for raw in batches:
                batch = {k: raw[k].to(device, non_blocking=True) for k in ("index", "label")}
                if "image" in raw:
                    raw = make_views(raw["image"].to(device, non_blocking=True), self.viewset, key, batch["index"]
                                     ) | batch
                yield [self.prepare(raw[c]) for c in self.columns], batch, raw
        finally:
            batches.close()

    # -- before_epoch: the recipe's hook, given a pass over the data it may read
    def before_epoch(self, epoch: int) -> None:
        self.parts.model.train()
        t0 = time.perf_counter()
        done = self.recipe.before_epoch(epoch, _Pass(self, epoch))
        if done:
            figures = ", ".join(f"{k} {v:g}" for k, v in done.items())
            self.log(f"[sslab] before epoch {epoch + 1}: {figures} ({time.perf_counter() - t0:.0f} s)")

    # -- the steps
    def train_epoch(self, epoch: int) -> dict:
        world = self.ctx.world_size
        self.meter = meter = EpochMeter(time.perf_counter())
        self.last_out: StepOut | None = None
        stream = self.stream(epoch)
        for i in range(self.steps_per_epoch):
            t_wait = time.perf_counter()
            item = next(stream, None)
            if meter.t1 is not None:
                meter.waited += time.perf_counter() - t_wait
            if item is None:
                break
            views, batch, raw = item
            for cb in self.callbacks:
                cb.on_step_start(self, self.step)
            try:
                out = train_step(self.parts, views, batch, self.step)
            except NonFiniteLoss as e:
                raise TrainingStopped(self.stop_message("loss is not finite", str(e))) from None
            self.step += 1
            meter.steps += 1
            meter.images += self.local_batch * world
            meter.loss_sum += out.loss.item()
            if meter.t1 is None:
                meter.t1, meter.images1 = time.perf_counter(), meter.images
            self.last_out = out
            for cb in self.callbacks:
                cb.on_step_end(self, raw, out)
        stream.close()  # ends a pass cut short at steps_per_epoch
        return self.epoch_metrics(epoch)

    def epoch_metrics(self, epoch: int) -> dict:
        m, now = self.meter, time.perf_counter()
        elapsed = now - m.t0
        loss = torch.tensor([m.mean_loss()], device=self.ctx.device)
        metrics = {"epoch": epoch + 1, "step": self.step, "loss": dist.all_reduce(loss, "mean").item(),
                   "lr": self.schedule.lr(max(0, self.step - 1)), "images_per_s": m.images / elapsed,
                   "epoch_s": elapsed}
        if m.steps > 1:
            metrics["steady_images_per_s"] = (m.images - m.images1) / (now - m.t1)
            metrics["data_wait_frac"] = m.waited / (now - m.t1)  # of the steady time, spent waiting on data
        if self.last_out is not None:
            metrics |= {k: float(v) for k, v in self.last_out.metrics.items()}
        return metrics

    # -- checkpoint + report: every rank reports; rank 0 also hands over the checkpoint
    def checkpoint_and_report(self, epoch: int, metrics: dict) -> None:
        stopping = self._stop is not None
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.ctx.rank == 0 and not stopping:  # a stopped state is never the latest checkpoint
                save_state(tmp, self.recipe, self.optimizer, epoch, self.step, self.spec)
                checkpoint = tmp
            persisted = self.ctx.report(metrics, checkpoint)
        if stopping:
            raise TrainingStopped(self.stop_message(*self._stop))
        self.good = (persisted, epoch + 1, self.step)

    def stop_message(self, what: str, value: str) -> str:
        """Short enough to survive Ray's truncation of worker errors (the last 500 characters are kept)."""
        if self.good is None:
            last = "No checkpoint was saved before it: start again"
        else:
            path, good_epoch, good_step = self.good
            where = path or f"the latest under {self.ctx.run_dir or 'the run directory'}"
            last = f"Last good checkpoint: {where} (epoch {good_epoch}, step {good_step})"
        return (f"training stopped at epoch {self.epoch + 1}, step {self.step}: {what} ({value}). {last}; lower the "
                f"learning rate or check the recipe's settings before resuming.")


class _Pass:
    """A pass over the stream that starts only if someone iterates it (the `data` of `before_epoch`)."""

    def __init__(self, trainer: Trainer, epoch: int):
        self.trainer, self.epoch = trainer, epoch

    def __iter__(self):
        return ((views, batch) for views, batch, _ in self.trainer.stream(self.epoch))
