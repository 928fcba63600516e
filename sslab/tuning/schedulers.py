"""Tune's trial schedulers, by name: what `sslab tune --scheduler` offers. An entry says how to build the scheduler
for a sweep, which trial driver (drivers.py) it needs, and what it checks before Ray starts; adding a scheduler is
adding an entry here.

PBT (Jaderberg et al., "Population Based Training of Neural Networks", 2017) needs Tune checkpoints, which a trial
streaming one Train run never makes: its trials train in segments of `--interval` epochs, report each segment's end
with its checkpoint, and a lagging trial restarts from a leader's checkpoint with perturbed hyperparameters. Only
continuous ranges are perturbed; choices (which may size a queue or a head) travel unchanged with the cloned config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

from ..config import ConfigError
from ..registry import Registry
from . import spaces
from .drivers import segment_driver, stream_driver


@dataclass(frozen=True)
class SchedulerEntry:
    summary: str                                  # one line for --help
    make: Callable[[Any], Any]                    # sweep -> a Tune TrialScheduler, or None for Tune's FIFO
    driver: Callable[[dict, Any], None]           # the function each trial runs
    check: Callable[[Any], None] = lambda sweep: None  # raise ConfigError for a sweep it cannot run
    reuse_actors: bool = False                    # keep a paused trial's actor (and its imports) for its next turn


SCHEDULERS: Registry[SchedulerEntry] = Registry("scheduler")


def asha(sweep) -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", max_t=sweep.epochs, grace_period=sweep.grace_period,
                         reduction_factor=sweep.reduction_factor)


class ClipToSpace:
    """PBT's explore multiplies values by 0.8 / 1.2: keep them inside their ranges (picklable for a resume)."""

    def __init__(self, space):
        self.space = space

    def __call__(self, config: dict) -> dict:
        for r in self.space:
            if r.name in config:
                config[r.name] = r.clip(config[r.name])
        return config


class SegmentPBT(PopulationBasedTraining):
    """Ray's PBT, minus the exploit at the last epoch: a trial that has finished has nothing left to gain from
    a clone, and its row would show the donor's results instead of its own."""

    def __init__(self, last_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch", 0) >= self.last_epoch:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_pbt(sweep) -> SegmentPBT:
    # synch: every trial reaches the segment's end before the bottom quarter clones the top quarter, so an
    # exploit compares trials at the same epoch
    return SegmentPBT(sweep.epochs, time_attr="epoch", perturbation_interval=sweep.interval,
                      hyperparam_mutations=spaces.mutations(sweep.space), custom_explore_fn=ClipToSpace(sweep.space),
                      quantile_fraction=0.25, resample_probability=0.25, synch=True, log_config=True)


def check_pbt(sweep) -> None:
    if sweep.resolved_search == "optuna":
        raise ConfigError("PBT picks its own configurations: use --search random with --scheduler pbt")
    if not spaces.mutations(sweep.space):
        raise ConfigError("--scheduler pbt perturbs continuous ranges mid-run; the space has none "
                          "(add e.g. temperature or KEY=uniform:LOW,HIGH)")


SCHEDULERS.add("asha", SchedulerEntry("stop trials whose kNN top-1 lags at an epoch (default)", asha, stream_driver))
SCHEDULERS.add("pbt", SchedulerEntry("exploit and explore: clone the leaders' checkpoints into the laggards",
                                     make_pbt, segment_driver, check_pbt, reuse_actors=True))
SCHEDULERS.add("fifo", SchedulerEntry("run every trial to the end", lambda sweep: None, stream_driver))
