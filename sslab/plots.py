"""Figures as PNGs, drawn with matplotlib on its Agg canvas (no display, no pyplot state): a training run's
per-epoch curves, and a sweep's trials (their kNN curves, and their final score against each searched knob).
matplotlib is imported inside the functions, so importing this module stays light."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# a run's panels, in order, each drawn when its key is in the history
RUN_KEYS = ("loss", "lr", "knn_top1", "alignment", "uniformity", "effective_rank", "collapse_score")
# how a trial's last point is drawn, by status: the shape on its curve, and the shape and colours of its scatter
MARKERS = {"done": {"marker": "o"},
           "stopped": {"marker": "o", "fillstyle": "none"},
           "failed": {"marker": "x", "markeredgewidth": 2},
           "unfinished": {"marker": "s", "fillstyle": "none"}}
SCATTER_COLORS = {"done": {"markerfacecolor": "royalblue", "markeredgecolor": "navy"},
                  "stopped": {"markeredgecolor": "navy"},
                  "failed": {"color": "firebrick"},
                  "unfinished": {"markeredgecolor": "navy"}}
LEGEND = {"done": "done", "stopped": "stopped early", "failed": "failed", "unfinished": "unfinished"}
EXPLOIT = {"marker": "*", "markersize": 13, "markeredgecolor": "black", "linestyle": "none"}


@dataclass
class SweepTrial:
    """One trial of a sweep, as its figures draw it."""
    name: str
    status: str                                # done | stopped | failed | unfinished
    history: list[tuple[int, float]]           # (epoch, metric) as reported
    knobs: dict[str, Any]                      # knob key -> the value to plot: a number or a category
    exploits: list[int] = field(default_factory=list)  # PBT: epochs it restarted from another trial's checkpoint

    @property
    def final(self) -> float:
        return self.history[-1][1] if self.history else math.nan


@dataclass(frozen=True)
class Knob:
    """A searched knob, as an x-axis: log-scaled, or categorical when it has categories (in their search order)."""
    key: str
    label: str
    log: bool = False
    categories: tuple = ()


def figure(width: float, height: float) -> Figure:
    """A Figure on the Agg canvas, laid out by matplotlib's constrained layout; 100 pixels an inch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str) -> str:
    """Write the figure as a PNG at path; returns path."""
    fig.savefig(path, format="png")
    return path


def _integer_epochs(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _series(history: list[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of one key, leaving out the epochs that lack it or report it as NaN or None."""
    points = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(history)
              if row.get(key) is not None and math.isfinite(row[key])]
    return [e for e, _ in points], [v for _, v in points]


def run_curves_figure(history: list[dict]) -> Figure:
    """A finished run's per-epoch curves, one subplot per metric of RUN_KEYS that the history holds (kNN top-1
    with the raw pixels' kNN top-1 dashed beside it)."""
    series = {k: _series(history, k) for k in (*RUN_KEYS, "knn_top1_pixels")}
    keys = [k for k in RUN_KEYS if series[k][0]]
    if not keys:
        raise ValueError(f"the history holds none of {', '.join(RUN_KEYS)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = figure(4.0 * cols, 3.0 * rows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(*series[key], marker=".", label=key)
        if key == "knn_top1" and series["knn_top1_pixels"][0]:
            ax.plot(*series["knn_top1_pixels"], linestyle="--", color="gray", label="raw pixels")
            ax.legend(fontsize="small")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
    return fig


def run_curves_png(history: list[dict], path: str) -> str:
    """Draw run_curves_figure(history) to the PNG at path; returns path."""
    return save_png(run_curves_figure(history), path)


def curves_panel(ax: Axes, trials: list[SweepTrial], metric: str) -> None:
    """Every trial's metric against the epoch: its last point marks its status, a star each PBT exploit."""
    from matplotlib.lines import Line2D

    for i, t in enumerate(trials):
        if not t.history:
            continue
        color = f"C{i % 10}"
        epochs, values = zip(*t.history)
        ax.plot(epochs, values, color=color, linewidth=1.4, gid=f"curve:{t.name}")
        ax.plot(epochs[-1:], values[-1:], color=color, linestyle="none", markersize=8, gid=f"{t.status}:{t.name}",
                **MARKERS[t.status])
        if t.exploits:
            ax.plot(t.exploits, np.interp(t.exploits, epochs, values), color=color, gid=f"exploit:{t.name}",
                    **EXPLOIT)
    statuses = [s for s in MARKERS if any(t.status == s and t.history for t in trials)]
    handles = [Line2D([], [], color="gray", linestyle="none", markersize=8, label=LEGEND[s], **MARKERS[s])
               for s in statuses]
    if any(t.exploits for t in trials):
        handles.append(Line2D([], [], color="gray", label="PBT exploit (restarted from another trial)", **EXPLOIT))
    if handles:
        ax.legend(handles=handles, fontsize="small", loc="lower right")
    ax.set_title(f"{metric} per epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    _integer_epochs(ax)


def knob_panel(ax: Axes, trials: list[SweepTrial], knob: Knob, metric: str) -> None:
    """Each scored trial's final metric against one knob: done filled, stopped early hollow, failed a cross."""
    scored = [t for t in trials if t.final == t.final and knob.key in t.knobs]
    xs = [t.knobs[knob.key] for t in scored]
    if knob.categories:
        cats = list(dict.fromkeys([*map(str, knob.categories), *map(str, xs)]))
        xs = [cats.index(str(v)) for v in xs]
        ax.set_xticks(range(len(cats)), cats)
        ax.set_xlim(-0.5, len(cats) - 0.5)
    elif knob.log:
        ax.set_xscale("log")
    for status in MARKERS:
        group = [i for i, t in enumerate(scored) if t.status == status]
        if group:
            ax.plot([xs[i] for i in group], [scored[i].final for i in group], linestyle="none", markersize=8,
                    gid=status, **MARKERS[status], **SCATTER_COLORS[status])
    ax.set_xlabel(knob.label)
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)


def knob_figure(trials: list[SweepTrial], knob: Knob, *, metric: str = "knn_top1", title: str = "") -> Figure:
    """One knob's scatter on its own, 640 x 420 pixels."""
    fig = figure(6.4, 4.2)
    knob_panel(fig.add_subplot(), trials, knob, metric)
    fig.suptitle(title)
    return fig


def sweep_figure(trials: list[SweepTrial], knobs: list[Knob], *, metric: str = "knn_top1",
                 title: str = "") -> Figure:
    """The curves of every trial (left, the widest panel) and beside them one scatter per knob, up to three a
    column, all on the curves' y-axis. fig.axes: the curves, then the knobs in order."""
    cols = math.ceil(len(knobs) / 3)
    rows = math.ceil(len(knobs) / cols) if knobs else 1
    fig = figure(7.0 + 3.6 * cols, max(4.8, 2.8 * rows))
    grid = fig.add_gridspec(rows, 1 + cols, width_ratios=[2] + [1] * cols)
    curves = fig.add_subplot(grid[:, 0])
    curves_panel(curves, trials, metric)
    for i, knob in enumerate(knobs):
        knob_panel(fig.add_subplot(grid[i % rows, 1 + i // rows], sharey=curves), trials, knob, metric)
    fig.suptitle(title)
    return fig
