"""The sweep's report: one row per trial (knobs, epochs run, final and best kNN top-1, status and why), printed
and written to SWEEP/report/ as trials.csv and trials.md, the best configuration as a preset `sslab train
--preset` reads (best.yaml), PNGs (sweep.png: every trial's knn_top1 per epoch beside its final score against
each knob; one PNG per knob with that scatter alone) and TensorBoard HParams (SWEEP/hparams)."""
from __future__ import annotations

import csv
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..platform.runs import guard_stop
from ..plots import Knob, SweepTrial, knob_figure, save_png, sweep_figure
from . import spaces
from .runner import METRIC, Sweep

# keys the preset leaves out: where the data is, and how the sweep placed and segmented its runs
NOT_IN_PRESET = ("data.path", "engine.workers", "engine.cpus_per_worker", "data.cpus_per_task")


@dataclass
class Row:
    trial: str
    knobs: dict[str, Any]
    status: str                   # done | stopped (by the scheduler, before the last epoch) | failed | unfinished
    epochs: int                   # epochs the trial's state has been trained for
    final: float = math.nan       # knn_top1 at the last report
    best: float = math.nan        # the highest knn_top1 reported
    reason: str = ""              # why it failed
    exploits: list[str] = field(default_factory=list)  # PBT: "cloned T after epoch E: what changed"
    checkpoint: str = ""          # the trial's latest checkpoint
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, knn_top1) as reported


def failure_reason(error) -> str:
    """The line that says why a trial failed, out of Ray's nested tracebacks."""
    text = str(error)
    found = guard_stop(error) or ([""] + re.findall(r"\w+Error: .+", text))[-1]
    if found:  # its first sentence: the engine's advice on checkpoints follows
        return found.strip().split(". ")[0][:300]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def trial_statuses(grid) -> dict[str, str]:
    """Tune's status of each trial by name (PENDING, RUNNING, PAUSED, TERMINATED, ERROR), as the experiment's
    saved state has it: after an interrupted fit() that state still says which trials a resume continues."""
    path = getattr(grid, "experiment_path", None)
    if not path:
        return {}
    from ray.tune import ExperimentAnalysis

    return {str(t): t.status for t in ExperimentAnalysis(path).trials}


def collect(sweep: Sweep, grid) -> list[Row]:
    """One Row per trial of a Tune ResultGrid."""
    statuses = trial_statuses(grid)
    rows = []
    for result in grid:
        knobs = spaces.overrides_for(sweep.space, result.config or {})
        df = result.metrics_dataframe
        history = []
        if df is not None and METRIC in df.columns:
            history = [(int(e), float(v)) for e, v in zip(df["epoch"], df[METRIC]) if v == v]
        m = result.metrics or {}
        epochs = int(m.get("epoch") or 0)
        row = Row(os.path.basename(str(result.path)), knobs, "done", epochs)
        if history:
            row.final, row.best = history[-1][1], max(v for _, v in history)
        if df is not None and "exploit" in df.columns:
            row.exploits = [str(x) for x in df["exploit"] if isinstance(x, str) and x]
        ckpt = m.get("checkpoint_path") or (result.checkpoint.path if result.checkpoint else "")
        row.checkpoint = str(ckpt or "")
        row.history = history
        if result.error is not None:
            row.status, row.reason = "failed", failure_reason(result.error)
        elif statuses.get(row.trial, "TERMINATED") != "TERMINATED":
            row.status = "unfinished"  # the sweep was interrupted: a resume continues it
        elif epochs < sweep.epochs:
            row.status = "stopped"
        rows.append(row)
    return sorted(rows, key=lambda r: r.trial)


def best_row(rows: list[Row]) -> Row | None:
    """The best final kNN top-1, among trials that ran every epoch when any did."""
    scored = [r for r in rows if r.final == r.final]
    done = [r for r in scored if r.status == "done"] or scored
    return max(done, key=lambda r: r.final, default=None)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4g}"
    return str(v)


def table(rows: list[Row], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "status", "epochs", *keys, "final knn_top1", "best knn_top1", "notes"]
    body = []
    for r in rows:
        note = r.reason or "; ".join(r.exploits)
        body.append([r.trial, r.status, str(r.epochs), *(_fmt(r.knobs.get(k, "")) for k in keys), _fmt(r.final),
                     _fmt(r.best), note])
    return header, body


def format_table(header: list[str], body: list[list[str]], width: int = 60) -> str:
    cells = [header] + [[c if len(c) <= width else c[:width - 3] + "..." for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def preset(sweep: Sweep, row: Row) -> dict:
    """The best trial's configuration as nested sections (a preset), without data path and placement."""
    typed = sweep.spec(row.knobs).flat()  # the values as the config has them (CLI overrides arrive as text)
    tree: dict[str, dict] = {}
    for key in sorted({**sweep.base, **row.knobs}):
        if key not in NOT_IN_PRESET:
            section, _, name = key.partition(".")
            value = typed[key]
            tree.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return tree


def write_report(sweep: Sweep, grid, out: str | None = None) -> dict[str, Any]:
    """Print the table and write every report file; returns {"rows", "best", "files"}."""
    rows = collect(sweep, grid)
    keys = [r.key for r in sweep.space]
    out = out or os.path.join(sweep.path, "report")
    os.makedirs(out, exist_ok=True)
    files = {}
    header, body = table(rows, keys)
    best = best_row(rows)

    files["csv"] = os.path.join(out, "trials.csv")
    with open(files["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "status", "epochs", *keys, "final_knn_top1", "best_knn_top1", "reason", "exploits",
                    "checkpoint"])
        for r in rows:
            w.writerow([r.trial, r.status, r.epochs, *(r.knobs.get(k, "") for k in keys), r.final, r.best,
                        r.reason, " | ".join(r.exploits), r.checkpoint])

    if best is not None:
        files["preset"] = os.path.join(out, "best.yaml")
        with open(files["preset"], "w") as fh:
            fh.write(f"# best trial {best.trial} of sweep {sweep.name}: {METRIC} {best.final:.4f} after "
                     f"{best.epochs} epochs\n# sslab train {sweep.recipe} --preset {files['preset']} --data DIR\n")
            yaml.safe_dump(preset(sweep, best), fh, sort_keys=False)

    lines = [f"# Sweep {sweep.name}: {sweep.recipe}", "",
             f"{len(rows)} trials, {sweep.scheduler} scheduler, {sweep.resolved_search} search, "
             f"{sweep.epochs} epochs at most, scored by {METRIC} (kNN top-1 on the test split).", "",
             "Space: " + "; ".join(f"`{r.describe()}`" for r in sweep.space), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    if best is not None:
        lines += ["", f"Best: **{best.trial}**, {METRIC} {best.final:.4f} ("
                  + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best.knobs.items()) + ")",
                  f"Preset: `{files['preset']}`", f"Checkpoint: `{best.checkpoint or '-'}`"]
    events = [(r.trial, e) for r in rows for e in r.exploits]
    if events:
        lines += ["", "PBT exploits:", ""] + [f"- {t} {e}" for t, e in events]
    files["markdown"] = os.path.join(out, "trials.md")
    with open(files["markdown"], "w") as fh:
        fh.write("\n".join(lines) + "\n")

    trials, knobs = plotted(sweep, rows)
    files["png"] = save_png(sweep_figure(trials, knobs, metric=METRIC, title=f"sweep {sweep.name}: {sweep.recipe}"),
                            os.path.join(out, "sweep.png"))
    for knob in knobs:
        fig = knob_figure(trials, knob, metric=METRIC, title=f"{sweep.name}: final {METRIC} per trial")
        files[f"png:{knob.key}"] = save_png(fig, os.path.join(out, f"{METRIC}_vs_{knob.key}.png"))

    files["hparams"] = write_hparams(sweep, rows)

    print(format_table(header, body))
    if best is not None:
        print(f"[sslab] best: {best.trial} {METRIC} {best.final:.4f} "
              + " ".join(f"{k}={_fmt(v)}" for k, v in best.knobs.items()))
        print(f"[sslab] best config as a preset: {files['preset']}")
        print(f"[sslab] best checkpoint: {best.checkpoint or '-'}")
    for t, e in events:
        print(f"[sslab] PBT exploit: {t} {e}")
    print(f"[sslab] report: {files['markdown']} {files['csv']} {files['png']} and {len(knobs)} PNG(s) in {out}")
    print(f"[sslab] TensorBoard (HParams, every trial's curves): tensorboard --logdir {sweep.path}")
    unfinished = sum(r.status == "unfinished" for r in rows)
    if unfinished:
        print(f"[sslab] the sweep did not finish ({unfinished} trial(s) unfinished); continue it with: "
              f"sslab tune {sweep.recipe} --name {sweep.name} --storage {sweep.storage}")
    return {"rows": rows, "best": best, "files": files, "unfinished": unfinished}


def plotted(sweep: Sweep, rows: list[Row]) -> tuple[list[SweepTrial], list[Knob]]:
    """The rows and the space as the figures take them: a 1-loguniform knob is drawn as 1 - value on a log axis,
    choices and grids as categories, and each PBT exploit at the epoch whose checkpoint the clone started from."""
    knobs = [Knob(r.key, ("1 - " if r.kind == "1-loguniform" else "") + r.key,
                  log=r.kind in ("loguniform", "1-loguniform"), categories=r.values if r.discrete else ())
             for r in sweep.space]
    trials = []
    for row in rows:
        x = {r.key: 1.0 - row.knobs[r.key] if r.kind == "1-loguniform" else row.knobs[r.key] for r in sweep.space
             if r.key in row.knobs}
        exploits = [int(e) for text in row.exploits for e in re.findall(r"after epoch (\d+)", text)]
        trials.append(SweepTrial(row.trial, row.status, row.history, x, exploits))
    return trials, knobs


def write_hparams(sweep: Sweep, rows: list[Row]) -> str:
    """One HParams session per trial under SWEEP/hparams, next to the Train runs' scalar curves."""
    from torch.utils.tensorboard import SummaryWriter

    path = os.path.join(sweep.path, "hparams")
    shutil.rmtree(path, ignore_errors=True)  # a re-written report replaces the sessions, never duplicates them
    writer = SummaryWriter(path)
    for r in rows:
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r.knobs.items()}
        metrics = {f"{METRIC}_final": r.final, f"{METRIC}_best": r.best, "epochs": float(r.epochs)}
        writer.add_hparams(hp | {"status": r.status}, metrics, run_name=r.trial)
    writer.close()
    return path
