"""The per-worker training loop run by Ray Train: build the recipe and optimiser, stream the worker's data shard,
step, schedule, monitor (kNN, collapse), checkpoint every epoch, report metrics, write TensorBoard on rank 0."""
from __future__ import annotations

import collections
import math
import os
import shutil
import tempfile
import time

import torch

from ..datasets.shards import read_manifest
from ..datasets.views import normalize, view_grid
from ..recipes import registry
from .. import dist
from ..evaluation.diagnostics import collapse_score
from ..evaluation.knn import eval_split, extract, knn_accuracy, pixel_knn
from .checkpoint import load_state, save_state
from ..schedules import cosine_ramp, lr_at
from .optim import build_optimizer
from .spec import RunSpec, build_recipe, steps_per_epoch

class TrainingStopped(RuntimeError):
    """Raised when the run must not go on: a non-finite loss or a collapsed representation."""


def fill_bank(recipe, shard, local_batch: int, columns, prepare, device, rank: int, epoch: int = 0) -> None:
    """A memory-bank recipe's fill pass, run before `epoch` when the recipe's `fills_bank(epoch)` asks for it: one
    pass of the training stream through the network as it is (no gradients; BN in training mode, as in the steps
    that follow) writes every bank row."""
    t0, rows = time.perf_counter(), 0
    it = iter(shard.iter_torch_batches(batch_size=local_batch, drop_last=True))
    while True:
        batch = next(it, None)
        # every rank writes the same number of batches (a collective); the rows of a last, partial global batch
        # stay random until their first visit
        if not dist.all_true(batch is not None and batch[columns[0]].shape[0] == local_batch, device):
            break
        recipe.fill_bank([prepare(batch[c]) for c in columns], {k: batch[k].to(device) for k in ("index", "label")})
        rows += local_batch * dist.world_size()
    if rank == 0:
        print(f"[sslab] memory bank filled from the {'untrained' if epoch == 0 else 'current'} encoder before epoch "
              f"{epoch + 1}: {rows} rows in {time.perf_counter() - t0:.0f} s", flush=True)


def train_worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`. `config` is RunSpec.to_dict() plus "log_dir"."""
    import ray.train
    import ray.train.torch

    spec = RunSpec.from_dict(config)
    eng = spec.engine
    device = ray.train.torch.get_device()
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(eng.seed)
    manifest = read_manifest(spec.data.path)
    image_size = spec.data.crop_size or manifest.image_size[0]
    viewset = registry.get(spec.recipe_name).views(spec.recipe, spec.data, image_size)
    columns = viewset.columns

    recipe = build_recipe(spec, manifest, image_size).to(device)
    # cross-GPU BN statistics, except for recipes that must keep BN per worker (MoCo's shuffle-BN sets sync_bn=False)
    if eng.use_gpu and world > 1 and getattr(recipe, "sync_bn", True):
        recipe = torch.nn.SyncBatchNorm.convert_sync_batchnorm(recipe)  # raises on CPU tensors: GPU only
    if eng.channels_last and device.type == "cuda":
        recipe = recipe.to(memory_format=torch.channels_last)
    local_batch = eng.batch_size // world
    peak_lr = eng.base_lr * eng.batch_size / 256
    optimizer = build_optimizer(eng.optimizer, recipe, peak_lr, eng.momentum, eng.weight_decay)

    start_epoch, step = 0, 0
    good = None  # (path, epoch, step) of the last checkpoint a resume would start from
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and eng.resume_from:  # a new run branching off another run's checkpoint (PBT's exploit)
        ckpt = ray.train.Checkpoint(eng.resume_from)
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_state(d, device)
        recipe.load_state_dict(state["recipe"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["global_step"]
        good = (ckpt.path, start_epoch, step)
        if rank == 0:
            print(f"[sslab] resumed from checkpoint after epoch {state['epoch'] + 1} (step {step})", flush=True)

    # the data-parallel wrapper syncs buffers once at start and then only averages gradients; recipe state
    # (queues, banks, centres) is kept identical by the recipes themselves, not re-broadcast every step
    model = ray.train.torch.prepare_model(recipe, move_to_device=False,
                                          parallel_strategy_kwargs={"forward_sync_buffers": False})
    if eng.compile:
        model = torch.compile(model)

    mean = torch.tensor(manifest.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(manifest.std, device=device).view(1, -1, 1, 1)

    def prepare(x):  # uint8 [n, C, H, W] -> normalised float on the device
        x = normalize(x.to(device, non_blocking=True), mean, std)
        return x.contiguous(memory_format=torch.channels_last) if eng.channels_last and device.type == "cuda" else x

    writer = TensorBoard(config["log_dir"]) if rank == 0 and config.get("log_dir") else None
    spe = steps_per_epoch(spec, manifest.count("train"))
    if spe < 1:
        raise ValueError(f"batch_size {eng.batch_size} is larger than the training set")
    total, warmup = spe * eng.epochs, int(eng.warmup_epochs * spe)
    shard = ray.train.get_dataset_shard("train")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=eng.amp and device.type == "cuda")
    baseline = None
    # the kNN monitor needs labels and a held-out split; unlabelled folders train without it
    knn_on = bool(eng.knn_every) and manifest.num_classes > 0 and manifest.count("test") > 0
    if rank == 0 and eng.knn_every and not knn_on:
        print("[sslab] kNN monitor off: the dataset has no labels or no test split", flush=True)

    fills_bank = getattr(recipe, "fills_bank", lambda epoch: False)
    last = min(eng.stop_after_epoch or eng.epochs, eng.epochs)  # a segment ends early; schedules span all epochs
    for epoch in range(start_epoch, last):
        model.train()
        if fills_bank(epoch):
            fill_bank(recipe, shard, local_batch, columns, prepare, device, rank, epoch)
        t0, seen, loss_sum, n_steps, embedding = time.perf_counter(), 0, 0.0, 0, None
        t1 = seen1 = None  # after the epoch's first step: the steady rate leaves the stream's start-up out
        waited = 0.0       # seconds blocked on the data stream after the first step (the pipeline's share)
        # on GPU, Ray's prefetch thread copies each batch to the device from pinned memory, overlapping the step
        it = iter(shard.iter_torch_batches(batch_size=local_batch, drop_last=True, pin_memory=device.type == "cuda"))
        for i in range(spe):
            t_wait = time.perf_counter()
            batch = next(it, None)
            if t1 is not None:
                waited += time.perf_counter() - t_wait
            if eng.fault_step and step == eng.fault_step - 1:
                inject_fault(config.get("run_dir"), rank, world, step)
            # every rank must take the same number of steps, or a collective hangs: stop together
            if not dist.all_true(batch is not None and batch[columns[0]].shape[0] == local_batch, device):
                break
            progress = step / total
            lr = lr_at(step, total, warmup, peak_lr, eng.final_lr_ratio)
            wd = eng.weight_decay if eng.weight_decay_end < 0 else \
                cosine_ramp(progress, eng.weight_decay, eng.weight_decay_end)
            for g in optimizer.param_groups:
                g["lr"] = lr
                if g["decay"]:  # groups without decay (biases, norms) stay without
                    g["weight_decay"] = wd
            views = [prepare(batch[c]) for c in columns]
            meta = {k: batch[k].to(device) for k in ("index", "label")}
            with autocast:
                out = model(views, meta, progress)
            loss = out.loss
            if not dist.all_true(bool(torch.isfinite(loss.detach())), device):  # all ranks stop together
                raise TrainingStopped(_stop_message("loss is not finite", f"{loss.item()}", epoch, step, config, good))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hasattr(recipe, "before_optimizer_step"):
                recipe.before_optimizer_step(progress)
            if eng.clip_grad:
                torch.nn.utils.clip_grad_norm_(recipe.parameters(), eng.clip_grad)
            optimizer.step()
            if hasattr(recipe, "after_step"):
                recipe.after_step(progress)
            step += 1
            n_steps += 1
            seen += local_batch * world
            loss_sum += loss.item()
            if t1 is None:
                t1, seen1 = time.perf_counter(), seen
            if out.embedding is not None:
                embedding = out.embedding
            if writer and epoch == start_epoch and i == 0:
                writer.add_image("views", view_grid([batch[c] for c in columns]), step)
            if rank == 0 and (i + 1) % eng.log_every == 0:
                rate = seen / (time.perf_counter() - t0)
                print(f"[sslab] epoch {epoch + 1}/{eng.epochs} step {i + 1}/{spe} loss {loss_sum / n_steps:.4f} "
                      f"lr {lr:.4g} {rate:.0f} img/s", flush=True)
        collections.deque(it, maxlen=0)  # drain a stream cut short, so the next epoch starts clean
        elapsed = time.perf_counter() - t0
        mean_loss = torch.tensor([loss_sum / max(1, n_steps)], device=device)
        # the collapse score of the epoch's last batch, averaged over ranks so every rank takes the same decision
        score = collapse_score(embedding) if embedding is not None else float("nan")
        score = dist.all_reduce(torch.tensor([score], device=device), "mean").item()
        collapsed = eng.collapse_threshold and math.isfinite(score) and score < eng.collapse_threshold
        metrics = {"epoch": epoch + 1, "step": step, "loss": dist.all_reduce(mean_loss, "mean").item(),
                   "lr": lr_at(max(0, step - 1), total, warmup, peak_lr, eng.final_lr_ratio),
                   "images_per_s": seen / elapsed, "epoch_s": elapsed, "collapse_score": score}
        if n_steps > 1:
            metrics["steady_images_per_s"] = (seen - seen1) / (t0 + elapsed - t1)
            metrics["data_wait_frac"] = waited / (t0 + elapsed - t1)  # of the steady time, spent waiting on data
        for k, v in (out.metrics.items() if n_steps else ()):
            metrics[k] = float(v)
        if knn_on and ((epoch + 1) % eng.knn_every == 0 or epoch + 1 == last):
            metrics["knn_top1"] = knn_monitor(recipe.encoder(), spec, manifest, prepare)
            if baseline is None:
                baseline = pixel_knn(spec.data.path, manifest.num_classes, eng.knn_bank, eng.knn_queries,
                                     eng.knn_k, eng.knn_t)
            metrics["knn_top1_pixels"] = baseline
        if writer:
            for k, v in metrics.items():
                if k not in ("epoch", "step") and math.isfinite(v):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()  # and, for a URI run directory, upload
        if rank == 0:
            knn = f" knn_top1 {metrics['knn_top1']:.4f} (raw pixels {baseline:.4f})" if "knn_top1" in metrics else ""
            print(f"[sslab] epoch {epoch + 1}/{eng.epochs} done: loss {metrics['loss']:.4f} "
                  f"{metrics['images_per_s']:.0f} img/s collapse_score {score:.3f}{knn}", flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and not collapsed:  # a collapsed state is never the latest checkpoint
                save_state(tmp, recipe, optimizer, epoch, step, spec)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if not collapsed:  # rank 0 knows where it was persisted; every rank knows which one it is
            good = (ray.train.get_checkpoint().path if checkpoint else None, epoch + 1, step)
        if collapsed:
            raise TrainingStopped(_stop_message("representation collapsed: collapse_score",
                                                f"{score:.4f} < engine.collapse_threshold {eng.collapse_threshold}",
                                                epoch, step, config, good))
    if writer:
        writer.close()


class TensorBoard:
    """Rank 0's SummaryWriter. For a URI log_dir (s3://, gs://, file://) events go to a local temp dir and
    `flush()` copies them up with pyarrow.fs: event files only grow, so each copy replaces the last one."""

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


def inject_fault(run_dir: str | None, rank: int, world: int, step: int) -> None:
    """Test-only (engine.fault_step): the last rank's process dies before that step, the first time only, as a
    lost worker would. A marker in the run directory (shared by every node) keeps the restarted group alive."""
    if rank != world - 1 or not run_dir:
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(run_dir)
    marker = f"{path}/fault_injected"
    if fs.get_file_info(marker).type != pyarrow.fs.FileType.NotFound:
        return
    # Train's controller collects reports (checkpoints) by polling every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s):
    # a worker lost sooner than that after a report can take the report with it, and the run then resumes from the
    # checkpoint before. Wait out two polls, so the fault lands where a real one usually does, long after the last
    # checkpoint.
    time.sleep(2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(f"rank {rank} exited before step {step + 1} at {time.time():.3f}\n".encode())
    print(f"[sslab] fault injected: rank {rank} exits before step {step + 1}", flush=True)
    os._exit(1)


def knn_monitor(encoder, spec: RunSpec, manifest, prepare) -> float:
    eng = spec.engine
    bank_x, bank_y = eval_split(spec.data.path, "train", eng.knn_bank)
    query_x, query_y = eval_split(spec.data.path, "test", eng.knn_queries)
    if spec.data.crop_size and spec.data.crop_size != manifest.image_size[0]:
        resize = lambda x: torch.nn.functional.interpolate(prepare(x), size=spec.data.crop_size, mode="bilinear")
    else:
        resize = prepare
    bank = extract(encoder, bank_x, resize)
    queries = extract(encoder, query_x, resize)
    return knn_accuracy(bank, bank_y, queries, query_y, manifest.num_classes, eng.knn_k, eng.knn_t)


def _stop_message(what: str, value: str, epoch: int, step: int, config: dict, good) -> str:
    """Short enough to survive Ray's truncation of worker errors (the last 500 characters are kept)."""
    if good is None:
        last = "No checkpoint was saved before it: start again"
    else:
        path, good_epoch, good_step = good
        where = path or f"the latest under {config.get('run_dir', 'the run directory')}"
        last = f"Last good checkpoint: {where} (epoch {good_epoch}, step {good_step})"
    return (f"training stopped at epoch {epoch + 1}, step {step}: {what} ({value}). {last}; lower the learning "
            f"rate or check the recipe's settings before resuming.")
