"""The sweep: a Ray Tune experiment whose trials are real Ray Train runs, scored by the kNN monitor.

Each trial runs the driver its scheduler names (schedulers.py, drivers.py), which builds the trial's RunSpec with
`make_spec(recipe, base | sampled keys)` and calls `sslab.platform.launch.train` — the same entry point as `sslab
train`. With ASHA or FIFO the run is one `fit()` whose epoch metrics reach Tune through `TuneReportCallback`; with
PBT it is a chain of segments. The sweep directory holds:

    SWEEP/sweep.yaml        the definition (recipe, fixed overrides, space, scheduler): what a resume re-reads
    SWEEP/<trial>/          Tune's trial directories (results, PBT's cloned checkpoints)
    SWEEP/runs/<run>/       the Train runs: checkpoints, TensorBoard
    SWEEP/report/           the report (report.py); SWEEP/hparams/: TensorBoard HParams
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from ..config import ConfigError
from . import spaces
from .schedulers import SCHEDULERS
from .spaces import Range

METRIC, MODE = "knn_top1", "max"
SEARCHES = ("auto", "random", "grid", "optuna")
DRIVER_CPUS = 0.1  # a trial's driver only waits on its Train run (whose controller takes no CPU)
DEFINITION = "sweep.yaml"


@dataclass
class Sweep:
    recipe: str
    base: dict[str, Any]            # dotted overrides every trial shares (data.path, epochs, workers, ...)
    space: list[Range]
    name: str
    storage: str
    scheduler: str = "asha"
    search: str = "auto"
    samples: int = 0                # trials drawn (random/optuna) or grid repeats; 0 = 8, or 1 with a grid
    concurrent: int = 0             # trials at once; 0 = what the cluster's resources hold
    grace_period: int = 1           # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2       # ASHA: keep 1/rf of the trials at each rung
    interval: int = 1               # PBT: epochs per segment (between exploit/explore decisions)

    @property
    def path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def runs(self) -> str:
        return f"{self.path}/runs"

    def spec(self, overrides: dict[str, Any] | None = None):
        from ..platform.spec import make_spec

        return make_spec(self.recipe, {"engine.workers": 1, **self.base, **(overrides or {})})

    @property
    def epochs(self) -> int:
        return self.spec().engine.epochs

    @property
    def resolved_search(self) -> str:
        if self.search != "auto":
            return self.search
        return "grid" if all(r.discrete for r in self.space) else "random"

    @property
    def num_samples(self) -> int:
        """Tune's num_samples: every sample runs the whole grid, so a space with a grid defaults to one."""
        gridded = self.resolved_search == "grid" or any(r.kind == "grid" for r in self.space)
        return self.samples or (1 if gridded else 8)

    @property
    def num_trials(self) -> int:
        grid = self.resolved_search == "grid"
        return self.num_samples * math.prod(len(r.values) for r in self.space if r.kind == "grid" or
                                            (grid and r.discrete))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = [r.to_dict() for r in self.space]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        return cls(**{**d, "space": [Range.from_dict(r) for r in d["space"]]})

    def save(self) -> None:
        if "://" in self.path:
            return  # remote storage: Tune's own experiment state is what a resume needs there
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, DEFINITION), "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)

    @classmethod
    def load(cls, path: str) -> "Sweep":
        with open(os.path.join(path, DEFINITION)) as fh:
            return cls.from_dict(yaml.safe_load(fh))


def default_name(recipe: str) -> str:
    return f"tune-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_sweep(storage: str, recipe: str) -> str | None:
    """The most recent sweep of `recipe` under `storage` (for `--resume` without `--name`)."""
    if not os.path.isdir(storage):
        return None
    found = [d for d in os.listdir(storage) if os.path.isfile(os.path.join(storage, d, DEFINITION))]
    found = [d for d in found if Sweep.load(os.path.join(storage, d)).recipe == recipe]
    return max(found, key=lambda d: os.path.getmtime(os.path.join(storage, d, DEFINITION)), default=None)


# ---------------------------------------------------------------- checks before Ray starts

def preflight(sweep: Sweep) -> None:
    """Everything checkable without a cluster: the search/scheduler combination, the base config and both ends
    of every range on the data (batch divisibility, the recipe's own checks such as a queue length)."""
    from ..platform.launch import validate, verify_data

    scheduler = SCHEDULERS.get(sweep.scheduler)
    if sweep.search not in SEARCHES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}, got {sweep.search!r}")
    search = sweep.resolved_search
    if search == "grid" and not all(r.discrete for r in sweep.space):
        cont = ", ".join(r.key for r in sweep.space if not r.discrete)
        raise ConfigError(f"--search grid needs choice/grid ranges only; {cont} are continuous")
    if search == "optuna":
        require_optuna()
        if any(r.kind == "grid" for r in sweep.space):
            raise ConfigError("--search optuna samples every range itself; use choice: instead of grid:")
    scheduler.check(sweep)
    if sweep.interval < 1 or sweep.grace_period < 1 or sweep.reduction_factor < 2:
        raise ConfigError("--interval and --grace-period must be >= 1, --reduction-factor >= 2")
    spec = sweep.spec()
    if not spec.engine.workers:
        raise ConfigError("engine.workers=0 (what fits) would let every trial take the whole cluster: give each "
                          "trial a worker count (--workers-per-trial)")
    manifest = validate(spec, spec.engine.workers)
    verify_data(spec, manifest)
    if not (spec.engine.knn_every and manifest.num_classes > 0 and manifest.count("test") > 0):
        raise ConfigError(f"a sweep scores trials by {METRIC}, the kNN monitor: it needs labels, a test split "
                          f"and engine.knn_every >= 1 (the data at {spec.data.path} has "
                          f"{manifest.num_classes} classes, {manifest.count('test')} test images)")
    for r in sweep.space:
        for v in r.endpoints():
            try:
                validate(sweep.spec({r.key: v}), spec.engine.workers)
            except ConfigError as e:
                raise ConfigError(f"--space {r.describe()}: at {r.key}={v!r}: {e}") from None


def require_optuna():
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("--search optuna needs the optuna package: pip install sslab[tune]") from None


def trial_resources(spec) -> dict[str, float]:
    """What one trial needs at once: its Train workers, its driver's share and room for its data pipeline, whose
    Parquet read tasks take a whole CPU each (trials that leave less than that hang: Ray Data then warns
    "Cluster resources are not enough to run any task from ...ReadFiles")."""
    data = max(1.0, spec.data.cpus_per_task)
    res = {"CPU": spec.engine.workers * spec.engine.cpus_per_worker + data + DRIVER_CPUS}
    if spec.engine.use_gpu:
        res["GPU"] = float(spec.engine.workers)
    return res


def default_concurrency(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """Trials that fit side by side: the tightest of CPUs and GPUs (at least one)."""
    fits = [cluster.get(k, 0.0) / v for k, v in per_trial.items() if v > 0]
    return max(1, int(math.floor(min(fits) + 1e-9))) if fits else 1


# ---------------------------------------------------------------- the sweep

class TrialName:
    """`simclr_ab12c_00003`: short names for trials, their directories and their Train runs (picklable, since
    Tune stores it with the experiment for a resume)."""

    def __init__(self, recipe: str):
        self.recipe = recipe

    def __call__(self, trial) -> str:
        return f"{self.recipe}_{trial.trial_id}"


def build_tuner(sweep: Sweep, concurrent: int):
    from ray import tune

    search = sweep.resolved_search
    entry = SCHEDULERS.get(sweep.scheduler)
    trainable = tune.with_resources(tune.with_parameters(entry.driver, sweep=sweep), {"CPU": DRIVER_CPUS})
    if tune.Tuner.can_restore(sweep.path):
        print(f"[sslab] resuming sweep {sweep.path}")
        return tune.Tuner.restore(sweep.path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    searcher = None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=sweep.spec().engine.seed)
    name = TrialName(sweep.recipe)
    return tune.Tuner(
        trainable,
        param_space=spaces.param_space(sweep.space, grid=search == "grid"),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=entry.make(sweep),
                                    num_samples=sweep.num_samples, max_concurrent_trials=concurrent,
                                    trial_name_creator=name, trial_dirname_creator=name,
                                    reuse_actors=entry.reuse_actors),
        run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def run_sweep(sweep: Sweep, *, address: str | None = None):
    """Run (or resume, when the sweep's directory holds one) a sweep; returns Tune's ResultGrid. A failing trial
    (non-finite loss, collapse, crash) ends as an errored trial and the others go on."""
    import ray

    from ..platform.launch import init_ray

    preflight(sweep)
    per_trial = trial_resources(sweep.spec())
    init_ray(address, per_trial["CPU"])
    fits = default_concurrency(per_trial, ray.cluster_resources())
    concurrent = sweep.concurrent = sweep.concurrent or fits
    if concurrent > fits:
        print(f"[sslab] warning: {concurrent} trials at once need {concurrent * per_trial['CPU']:g} CPUs, the "
              f"cluster has {ray.cluster_resources().get('CPU', 0):g}: their data pipelines may wait on each "
              f"other (lower engine.cpus_per_worker, or --concurrent {fits})")
    print(f"[sslab] sweep {sweep.name}: {sweep.recipe}, {sweep.num_trials} trial(s), {sweep.scheduler} "
          f"scheduler, {sweep.resolved_search} search, up to {concurrent} trial(s) at once, "
          f"{sweep.spec().engine.workers} Train worker(s) per trial")
    for r in sweep.space:
        print(f"[sslab]   {r.describe()}")
    print(f"[sslab] sweep directory: {sweep.path} (tensorboard --logdir {sweep.path})")
    tuner = build_tuner(sweep, concurrent)
    sweep.save()
    return tuner.fit()
