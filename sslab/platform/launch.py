"""Start a training run: validate everything locally, start (or join) Ray, build the TorchTrainer, fit. The
worker function runs the loop (loop.py) in the Ray context (context.py)."""
from __future__ import annotations

import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass

from ..config import ConfigError
from ..datasets.pipeline import start_run_actor, train_dataset
from ..datasets.shards import read_manifest
from ..recipes import registry
from .callbacks import default_callbacks
from .checkpoint import check_resumable
from . import reaper
from .console import RunLog, driver_console, quiet_stderr
from .context import RayContext
from .loop import Trainer
from .runs import ended, recording, resolve_storage, run_lock
from .spec import RunSpec, steps_per_epoch


@dataclass(frozen=True)
class Placement:
    workers: int
    cpus_per_worker: float
    use_gpu: bool


def verify_data(spec: RunSpec, manifest) -> None:
    """The shards against their manifest (data.verify: checksums and sample images too), once per command."""
    try:
        manifest.verify(checksums=spec.data.verify, sample=4 if spec.data.verify else 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def plan_workers(spec: RunSpec, cluster_cpus: float | None = None, cluster_gpus: float | None = None) -> Placement:
    """Workers requested, or what fits: one per GPU with use_gpu, else one per two CPUs (torch threads and the
    data pipeline's tasks share the rest)."""
    eng = spec.engine
    if eng.workers:
        n = eng.workers
    elif eng.use_gpu:
        n = max(1, int(cluster_gpus or 0))
    else:
        n = max(1, int((cluster_cpus or os.cpu_count() or 1) // 2))
    return Placement(n, eng.cpus_per_worker, eng.use_gpu)


def validate(spec: RunSpec, workers: int):
    """Checks that need the data: everything a worker would trip over, found before any cluster time is spent."""
    manifest = read_manifest(spec.data.path)
    eng = spec.engine
    if eng.worker_resource in ("CPU", "GPU", "memory", "object_store_memory"):
        raise ConfigError(f"engine.worker_resource={eng.worker_resource!r} must name a custom resource; "
                          f"CPUs and GPUs are set by engine.cpus_per_worker and engine.use_gpu")
    if eng.batch_size % workers:
        raise ConfigError(f"engine.batch_size={eng.batch_size} must be divisible by the {workers} workers")
    if eng.batch_size // workers < 2:
        raise ConfigError(f"engine.batch_size={eng.batch_size} leaves fewer than 2 images per worker")
    if steps_per_epoch(spec, manifest.count("train")) < 1:
        n = manifest.count("train")
        used = f"{spec.data.limit} training images data.limit={spec.data.limit} leaves" \
            if spec.data.limit and spec.data.limit < n else f"{n} training images"
        raise ConfigError(f"engine.batch_size={eng.batch_size} is larger than the {used}")
    size = spec.data.crop_size or manifest.image_size[0]
    if size > manifest.image_size[0]:
        raise ConfigError(f"data.crop_size={size} is larger than the stored images ({manifest.image_size[0]} px)")
    info = registry.get(spec.recipe_name)
    try:
        info.views(spec.recipe, spec.data, size)  # view specs validate their ranges
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if hasattr(info.cls, "check_spec"):
        info.cls.check_spec(spec, manifest)
    return manifest


# Train V2 re-routes worker print() into its logger and also tees it to the (wrapped) stdout, so every progress
# line would reach the console twice; plain prints are forwarded by Ray once.
RUNTIME_ENV = {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def init_ray(address: str | None, want_cpus: float, verbose: bool = True):
    """Join `address` (ray://host:10001, auto, or $RAY_ADDRESS when not given), or start a local instance
    sized so Train workers and the data pipeline both fit. Logical CPUs are over-subscribed a little on small
    machines: the OS shares the cores, and Ray would otherwise leave no slot for the decode tasks."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for drivers started by `ray job submit`
    if address:
        ray.init(address=address, log_to_driver=verbose, runtime_env=RUNTIME_ENV)
        return
    cores = os.cpu_count() or 1
    num_cpus = max(cores, int(want_cpus + 0.999) + 1)
    if want_cpus > cores:
        print(f"[sslab] warning: the run asks for {want_cpus:g} CPUs (Train workers and data tasks) on a {cores}-core "
              f"machine: they will take turns on the cores, which is slower than asking for fewer")
    # address="local": a fresh instance even if `ray start` left one running here (join it with --address auto).
    # The dashboard listens on 127.0.0.1 only. Its state API is what Train V2's placement-group cleaner asks whether
    # the run's controller lives; looking the API up by itself, it would find whichever Ray instance on this machine
    # is newest (and, asking that one, may take the live controller for dead). So the port is chosen here and every
    # worker of the run is told it.
    port = _free_port()
    env_vars = RUNTIME_ENV["env_vars"] | {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    # Ray's Prometheus endpoint listens on every interface: off unless RAY_enable_metrics_collection=1 asks for it
    metrics = os.environ.get("RAY_enable_metrics_collection", "0").lower() in ("1", "true")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, log_to_driver=verbose,
             runtime_env=RUNTIME_ENV | {"env_vars": env_vars}, _system_config={"enable_metrics_collection": metrics})
    if ray.is_initialized():   # Ray's processes end with this one, even a killed one
        reaper.watch(ray.get_runtime_context().get_node_id())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def run_name(spec: RunSpec, name: str | None) -> str:
    """The run's folder name under the storage: given, or `<recipe>-<timestamp>`. One folder, never a path."""
    if name is None:
        return f"{spec.recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"--name {name!r}: a run name is one folder name (letters, digits, '.', '_', '-'; not "
                          f"starting with '.', no '..'), e.g. --name fmnist-simclr")
    return name


def train_worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the loop in the Ray context, with the standard callbacks and the
    caller's. `config` is what `train` puts in `train_loop_config`."""
    spec = RunSpec.from_dict(config["spec"])
    context = RayContext(config["run_dir"], config["start_from"], config["run_log"], spec.data.shuffle_rows)
    callbacks = default_callbacks(config["log_dir"]) + list(config["callbacks"])
    Trainer(spec, context, callbacks, stop_after_epoch=config["stop_after_epoch"]).run()


def train(spec: RunSpec, *, name: str | None = None, storage: str | None = None, address: str | None = None,
          callbacks: list | None = None, worker_callbacks=(), stop_after_epoch: int = 0, start_from: str = "",
          verbose: bool = False):
    """Run (or resume, when `name` exists under `storage`) a training run; returns Ray Train's Result.

    `callbacks`: Ray Train callbacks (they run in Train's controller, e.g. Tune's report callback);
    `worker_callbacks`: loop callbacks (callbacks.Callback) run in every worker after the standard ones;
    `stop_after_epoch`: end after that epoch while the schedules still span engine.epochs (PBT's segments);
    `start_from`: a run with no checkpoint of its own starts from this checkpoint directory (path or URI) --
    weights, optimizer, recipe state, epoch (PBT's exploit);
    `verbose`: show Ray's own output (workers' output, the driver's warnings and logs); otherwise only sslab's lines
    and progress are shown and Ray's driver output goes to RUN_DIR/ray.log (console.py).

    Before Ray starts: the name is checked, the run directory locked against a second `train` of the same name,
    and an existing run's newest usable checkpoint must fit the recipe this spec builds."""
    import ray

    storage = resolve_storage(storage)
    name = run_name(spec, name)
    run_dir = f"{storage.rstrip('/')}/{name}"
    placement = plan_workers(spec)
    manifest = validate(spec, placement.workers)
    verify_data(spec, manifest)
    with run_lock(run_dir):
        resumes = check_resumable(run_dir, spec)
        ray_log = (os.path.join(run_dir, "ray.log") if "://" not in run_dir
                   else os.path.join(tempfile.gettempdir(), f"sslab-{name}-ray.log"))
        if not verbose:
            print(f"[sslab] Ray's own messages: {ray_log} (--verbose shows them here)")
        with quiet_stderr(ray_log, enabled=not verbose):
            init_ray(address, placement.workers * placement.cpus_per_worker + spec.data.cpus_per_task, verbose)
            if not spec.engine.workers:
                res = ray.cluster_resources()
                placement = plan_workers(spec, res.get("CPU"), res.get("GPU"))
                validate(spec, placement.workers)
            log_dir = run_dir + "/tensorboard"  # a URI too: rank 0 writes locally and uploads every epoch
            n = manifest.count("train")
            used = f"{spec.data.limit} of {n}" if spec.data.limit and spec.data.limit < n else f"{n}"
            print(f"[sslab] run {name}: {spec.recipe_name} on {used} images, "
                  f"{placement.workers} worker(s) x {placement.cpus_per_worker} CPU"
                  f"{' + 1 GPU' if placement.use_gpu else ''}, global batch {spec.engine.batch_size}")
            print(f"[sslab] checkpoints and metrics: {run_dir}" + (f" (resuming from {resumes})" if resumes else ""))
            print(f"[sslab] TensorBoard: tensorboard --logdir {log_dir}")
            run_log = f"sslab-run-{uuid.uuid4().hex[:12]}"     # skipped rows and console messages
            log = start_run_actor(run_log, RunLog)
            config = {"spec": spec.to_dict(), "log_dir": log_dir, "run_dir": run_dir, "run_log": run_log,
                      "callbacks": list(worker_callbacks), "stop_after_epoch": stop_after_epoch,
                      "start_from": start_from}
            try:
                with recording(run_dir, spec.recipe_name, stop_after_epoch or spec.engine.epochs) as end, \
                        driver_console(log):
                    result = torch_trainer(spec, name, storage, placement, manifest, config, callbacks).fit()
                    end.update(ended(result.error))
                    return result
            finally:
                try:
                    report_bad_rows(log, manifest)
                except ray.exceptions.RayActorError as e:   # its node lost: the result matters more
                    print(f"[sslab] skipped rows unknown: the run's log actor is gone ({type(e).__name__})")
                finally:
                    ray.kill(log)


def report_bad_rows(log, manifest) -> None:
    """The run's skipped rows, once at its end: how many, and the first few by shard file and index."""
    import ray

    n = ray.get(log.count.remote())
    if not n:
        return
    ends, files = [], manifest.splits["train"]
    for f in files:
        ends.append((ends[-1] if ends else 0) + f.rows)
    where = lambda i: files[next(k for k, end in enumerate(ends) if i < end)].path.rsplit("/", 1)[-1]
    first = "; ".join(f"{where(i)} index {i}: {why}" for i, why in ray.get(log.first.remote()))
    print(f"[sslab] skipped {n} unreadable training image(s), each every epoch it came up: {first}")


def torch_trainer(spec: RunSpec, name: str, storage: str, placement: Placement, manifest, config: dict, callbacks):
    """Ray Train's TorchTrainer for the run: workers, storage and checkpoint policy, the data stream."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    viewset = None if spec.data.augment == "worker" else registry.get(spec.recipe_name).views(
        spec.recipe, spec.data, spec.data.crop_size or manifest.image_size[0])
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=placement.workers, use_gpu=placement.use_gpu,
                                     resources_per_worker={"CPU": placement.cpus_per_worker} |
                                     ({spec.engine.worker_resource: 1} if spec.engine.worker_resource else {})),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.engine.checkpoint_keep),
                             failure_config=FailureConfig(max_failures=spec.engine.max_failures)),
        datasets={"train": train_dataset(spec.data, manifest, viewset, config["run_log"])},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
