"""What watches a run: the guards, the kNN and representation monitors, TensorBoard and the console. Each is
a `Callback` the loop calls at fixed points; a callback may add metrics in `on_epoch_end` (monitors run first,
loggers last, in the order of `default_callbacks`) or ask the loop to stop (`trainer.request_stop`). Tests add
their own (fault injection lives in tests/, not here).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import torch

from .. import dist
from ..datasets.views import view_grid
from ..evaluation.diagnostics import collapse_score, representation_scores, sample_views
from ..evaluation.knn import eval_split, extract, knn_accuracy, pixel_knn
from .runs import append_history, read_history


class Callback:
    """Hooks of a run; each defaults to nothing. `trainer` is the running `loop.Trainer`."""

    def on_run_start(self, trainer) -> None:
        """After setup and resume, before the first epoch of this run."""

    def on_step_start(self, trainer, step: int) -> None:
        """Before global step `step` (0-based), its batch in hand."""

    def on_step_end(self, trainer, batch: dict, out) -> None:
        """After the step: `batch` as the stream gave it (uint8 views), `out` the recipe's StepOut."""

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        """After the epoch's steps, before its checkpoint and report: add to `metrics`, or stop the run."""

    def on_run_end(self, trainer) -> None:
        """After the last epoch of this run, or when it stops with an error."""


def eval_prepare(trainer):
    """uint8 stored images -> the encoder's input: normalised, on the device, at the training views' size."""
    size = trainer.image_size

    def prepare(x):
        x = trainer.prepare(x)
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear") if x.shape[-1] != size else x
    return prepare


class KnnMonitor(Callback):
    """Weighted kNN top-1 of the encoder's features (engine.knn_*: bank of training images, test queries) every
    `knn_every` epochs and at the last, beside the same kNN on raw pixels. Needs labels and a test split."""

    def on_run_start(self, trainer) -> None:
        eng, m = trainer.spec.engine, trainer.manifest
        self.on = bool(eng.knn_every) and m.num_classes > 0 and m.count("test") > 0
        self.baseline = None
        if eng.knn_every and not self.on:
            trainer.log("[sslab] kNN monitor off: the dataset has no labels or no test split")

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        eng, done = trainer.spec.engine, trainer.epoch + 1
        if not (self.on and (done % eng.knn_every == 0 or done == trainer.last_epoch)):
            return
        path, prepare = trainer.spec.data.path, eval_prepare(trainer)
        bank_x, bank_y = eval_split(path, "train", eng.knn_bank)
        query_x, query_y = eval_split(path, "test", eng.knn_queries)
        encoder = trainer.recipe.encoder()
        bank, queries = extract(encoder, bank_x, prepare), extract(encoder, query_x, prepare)
        metrics["knn_top1"] = knn_accuracy(bank, bank_y, queries, query_y, trainer.manifest.num_classes, eng.knn_k,
                                           eng.knn_t)
        if self.baseline is None:
            self.baseline = pixel_knn(path, trainer.manifest.num_classes, eng.knn_bank, eng.knn_queries, eng.knn_k,
                                      eng.knn_t)
        metrics["knn_top1_pixels"] = self.baseline


class RepresentationMonitor(Callback):
    """Alignment, uniformity and effective rank (evaluation.diagnostics) every epoch, on the first
    engine.diagnostics training images and one fixed pair of views of them, made once per run; needs no labels."""

    def on_run_start(self, trainer) -> None:
        n = trainer.spec.engine.diagnostics
        self.images = None
        if n:
            from ..datasets.shards import load_split

            images = torch.from_numpy(load_split(trainer.spec.data.path, "train", n, skip_bad=True)[0])
            if len(images) >= 2:
                self.images = images
                self.views = sample_views(images, trainer.image_size, trainer.spec.engine.seed)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if self.images is None:
            return
        metrics |= representation_scores(trainer.recipe.encoder(), self.images, self.views, eval_prepare(trainer))


class CollapseGuard(Callback):
    """SimSiam's collapse score (evaluation.diagnostics) of the epoch's last embedding, averaged over ranks so all
    take the same decision; below engine.collapse_threshold the run stops, and the collapsed state is never
    checkpointed."""

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        out = trainer.last_out
        score = collapse_score(out.embedding) if out is not None and out.embedding is not None else float("nan")
        score = dist.all_reduce(torch.tensor([score], device=trainer.ctx.device), "mean").item()
        metrics["collapse_score"] = score
        threshold = trainer.spec.engine.collapse_threshold
        if threshold and math.isfinite(score) and score < threshold:
            trainer.request_stop("representation collapsed: collapse_score",
                                 f"{score:.4f} < engine.collapse_threshold {threshold}")


class DataGuard(Callback):
    """Counts the training rows the stream skipped because they would not decode, and stops the run once they are
    more than data.max_bad_fraction of the training rows."""

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        bad = torch.tensor([float(trainer.ctx.bad_rows())], device=trainer.ctx.device)
        bad = int(dist.all_reduce(bad, "max").item())   # ranks may ask a moment apart: agree on one count
        metrics["bad_rows"] = bad
        total = min(trainer.manifest.count("train"), trainer.spec.data.limit or trainer.manifest.count("train"))
        if bad > trainer.spec.data.max_bad_fraction * total:
            trainer.request_stop("unreadable training images", f"{bad} of {total} rows > data.max_bad_fraction "
                                 f"{trainer.spec.data.max_bad_fraction:g}; `sslab data prepare` the data again")


class DivergenceGuard(Callback):
    """Stops the run when the weights' global L2 norm passes engine.divergence_factor times its value at the run's
    start: a learning rate far too high blows the weights up while L2-normalised outputs keep the loss and the
    collapse score looking normal. Weights are the same on every rank, so every rank stops at the same step."""

    def on_run_start(self, trainer) -> None:
        self.params = [p for p in trainer.recipe.parameters() if p.requires_grad]
        self.start = self.norm()

    def norm(self) -> float:
        return torch.stack(torch._foreach_norm([p.detach() for p in self.params])).norm().item()

    def on_step_end(self, trainer, batch: dict, out) -> None:
        factor = trainer.spec.engine.divergence_factor
        if not (factor and self.params):
            return
        norm = self.norm()
        if not norm <= factor * self.start:  # NaN counts too
            trainer.stop_now("weights diverged: their L2 norm", f"{norm:.3g} > engine.divergence_factor "
                             f"{factor:g} x {self.start:.3g} at the start")


class TensorBoard:
    """A SummaryWriter. For a URI log_dir (s3://, gs://, file://) events go to a local temp dir and `flush()` copies
    them up with pyarrow.fs: event files only grow, so each copy replaces the last one."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = log_dir if "://" in log_dir else None
        self.local = tempfile.mkdtemp(prefix="sslab-tb-") if self.remote else log_dir
        self.writer = SummaryWriter(self.local)

    def __getattr__(self, name):  # add_scalar, add_image, ...
        return getattr(self.writer, name)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(self.remote)
            fs.create_dir(path, recursive=True)
            pyarrow.fs.copy_files(self.local, path, destination_filesystem=fs)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class TensorBoardLogger(Callback):
    """Rank 0 writes, under the run's tensorboard/ folder: loss, lr and images/s every engine.log_every steps
    (`step/*`, x = global step); every epoch's metrics (x = epoch); a grid of the views at the run's first step;
    and at the end the run's resolved config as HParams beside its final metrics, so runs compare side by side."""

    def __init__(self, log_dir: str):
        self.log_dir, self.writer = log_dir, None

    def on_run_start(self, trainer) -> None:
        if trainer.ctx.rank == 0 and self.log_dir:
            self.writer = TensorBoard(self.log_dir)
        self.first, self.final = True, {}

    def on_step_end(self, trainer, batch: dict, out) -> None:
        if not self.writer:
            return
        m = trainer.meter
        if self.first:
            self.writer.add_image("views", view_grid([batch[c] for c in trainer.columns]), trainer.step)
            self.first = False
        if m.steps == 1:
            self.mark = (0, 0.0, 0, m.t0)         # the interval's start: steps, loss sum, images, time
        if m.steps % trainer.spec.engine.log_every == 0:
            steps, loss_sum, images, t = self.mark
            now = time.perf_counter()
            self.writer.add_scalar("step/loss", (m.loss_sum - loss_sum) / (m.steps - steps), trainer.step)
            self.writer.add_scalar("step/lr", trainer.schedule.lr(trainer.step - 1), trainer.step)
            self.writer.add_scalar("step/images_per_s", (m.images - images) / max(now - t, 1e-9), trainer.step)
            self.mark = (m.steps, m.loss_sum, m.images, now)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if not self.writer:
            return
        for k, v in metrics.items():
            if k not in ("epoch", "step") and math.isfinite(v):
                self.writer.add_scalar(k, v, metrics["epoch"])
        self.final = dict(metrics)
        self.writer.flush()  # and, for a URI run directory, upload

    def on_run_end(self, trainer) -> None:
        if not self.writer:
            return
        if self.final:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in trainer.spec.flat().items()}
            add_hparams(self.writer.writer, {"recipe": trainer.spec.recipe_name} | hparams,
                        {f"final/{k}": v for k, v in self.final.items() if math.isfinite(v)})
        self.writer.close()


def add_hparams(writer, hparams: dict, metrics: dict) -> None:
    """HParams into the writer's own event file (SummaryWriter.add_hparams would open a sub-run per call)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    for summary in hparams_summary(hparams, metrics):
        writer.file_writer.add_summary(summary)
    for k, v in metrics.items():
        writer.add_scalar(k, v)


class History(Callback):
    """Rank 0 appends every epoch's metrics to the run directory's metrics.jsonl (what `sslab runs` reads) and, at
    the end of the run, draws them as curves.png there."""

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if trainer.ctx.rank == 0:
            append_history(trainer.ctx.run_dir, metrics)

    def on_run_end(self, trainer) -> None:
        run_dir = trainer.ctx.run_dir
        if trainer.ctx.rank != 0 or not run_dir or "://" in run_dir:
            return
        history = read_history(run_dir)
        if history:
            from ..plots import run_curves_png

            try:   # a picture must never hide how the run ended (this runs while a stop or an error unwinds)
                run_curves_png(history, os.path.join(run_dir, "curves.png"))
            except Exception as e:
                trainer.log(f"[sslab] curves.png not drawn: {type(e).__name__}: {e}")


class Console(Callback):
    """Rank 0's progress (a bar, or a line every engine.log_every steps) and a summary line per epoch."""

    def on_step_end(self, trainer, batch: dict, out) -> None:
        m, eng = trainer.meter, trainer.spec.engine
        if trainer.ctx.rank == 0:   # the context shows it: a bar on a terminal, else a line every log_every steps
            trainer.ctx.progress({"epoch": trainer.epoch + 1, "epochs": eng.epochs, "step": m.steps,
                                  "steps": trainer.steps_per_epoch, "loss": m.mean_loss(),
                                  "lr": trainer.schedule.lr(trainer.step - 1), "rate": m.rate(),
                                  "batch": eng.batch_size, "log_every": eng.log_every})

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        knn = (f" knn_top1 {metrics['knn_top1']:.4f} (raw pixels {metrics['knn_top1_pixels']:.4f})"
               if "knn_top1" in metrics else "")
        collapse = f" collapse_score {metrics['collapse_score']:.3f}" if "collapse_score" in metrics else ""
        diag = (f" align {metrics['alignment']:.3f} unif {metrics['uniformity']:.3f} "
                f"rank {metrics['effective_rank']:.1f}" if "effective_rank" in metrics else "")
        trainer.log(f"[sslab] epoch {metrics['epoch']}/{trainer.spec.engine.epochs} done: loss {metrics['loss']:.4f} "
                    f"{metrics['images_per_s']:.0f} img/s{collapse}{diag}{knn}")


def default_callbacks(log_dir: str = "") -> list[Callback]:
    """The standard watchers: the per-step guard, then monitors, the epoch guard and the loggers."""
    return [DivergenceGuard(), KnnMonitor(), RepresentationMonitor(), CollapseGuard(), DataGuard(),
            TensorBoardLogger(log_dir), History(), Console()]
