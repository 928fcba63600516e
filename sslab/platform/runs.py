"""What a run directory says about its run, and `sslab runs`: one line per run under a storage folder.

Two small files sit beside Ray's checkpoints in every local run directory:
- `run.json`, written by the driver: recipe, planned epochs, when it started and ended, and how it ended
  (finished, stopped with the guard's reason, failed with the first line of the error, interrupted);
- `metrics.jsonl`, appended by rank 0 after every epoch: that epoch's metrics (a resumed epoch appends again; the
  last line of an epoch wins).
A run whose `run.json` says running while no process holds its lock was killed (e.g. SIGKILL, a lost machine):
it is listed as interrupted. URI storage (s3://...) keeps TensorBoard and checkpoints only.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
import time

from ..config import ConfigError
from .reaper import start_time

RECORD = "run.json"
HISTORY = "metrics.jsonl"
LOCK_FILE = ".sslab-run.lock"


def default_storage() -> str:
    return os.path.abspath(os.environ.get("SSLAB_STORAGE", "runs"))


def resolve_storage(storage: str | None) -> str:
    """Local paths become absolute; URIs (s3://, gs://, ...) pass through to Ray's pyarrow filesystems."""
    storage = storage or default_storage()
    return storage if "://" in storage else os.path.abspath(storage)


def _alive(pid: int, since: float | None = None) -> bool:
    """Whether process `pid` of this host runs: it exists, is not a zombie (dead, not yet collected by its parent)
    and, with `since`, had started by then (a later start means the pid was reused). Without /proc: exists."""
    try:
        with contextlib.suppress(PermissionError):      # another user's process: it exists
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    if not os.path.isdir("/proc/self"):
        return True
    ticks = start_time(pid)
    if ticks is None:                                   # a zombie (or gone since)
        return False
    if since is None:
        return True
    with open("/proc/stat") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= since + 2    # boot time has 1 s resolution


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def lock_owner_alive(path: str) -> bool:
    """Whether a run lock is held: the file exists and its owner lives (or runs on another host: cannot tell)."""
    owner = _read_lock(path)
    return owner is not None and (owner.get("host") != socket.gethostname()
                                  or _alive(int(owner.get("pid", -1)), owner.get("since")))


@contextlib.contextmanager
def run_lock(run_dir: str):
    """One `train` per run directory at a time: a lock file holding the owner's pid and host, removed at the end.
    A lock whose owner is gone (same host; no such process, a zombie, or its pid reused since) is taken over with a
    message. URI storage holds no lock (object stores have no exclusive create)."""
    if "://" in run_dir:
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    path, host = os.path.join(run_dir, LOCK_FILE), socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = _read_lock(path) or {}
            if lock_owner_alive(path):
                raise ConfigError(f"run {run_dir} is in use by pid {owner.get('pid', '?')} on "
                                  f"{owner.get('host', '?')} since {time.ctime(owner.get('since', 0))}: wait for "
                                  f"it, or pick another --name (if that process is gone, delete {path})") from None
            print(f"[sslab] taking over {path}: its owner, pid {owner.get('pid')} on this host, is gone")
            os.remove(path)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "since": time.time()}, f)
    try:
        yield
    finally:
        os.remove(path)


def write_record(run_dir: str, **fields) -> None:
    """Merge `fields` into the run's record (local run directories only), atomically."""
    if "://" in run_dir:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, RECORD)
    record = read_record(run_dir) | fields
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


@contextlib.contextmanager
def recording(run_dir: str, recipe: str, epochs: int):
    """run.json around a run: running at the start; at the end how it ended (the caller puts `ended(result.error)`
    into the yielded dict; an exception counts as failed, anything else as interrupted) and its wall time, which
    adds up over the resumes of a run."""
    started = time.time()
    write_record(run_dir, recipe=recipe, epochs=epochs, status="running", reason="", started=started, ended=None)
    end = {"status": "interrupted", "reason": "stopped by the user or a signal"}
    try:
        yield end
    except Exception as e:
        end.update(ended(e))
        raise
    finally:
        now = time.time()
        write_record(run_dir, **end, ended=now, wall_s=read_record(run_dir).get("wall_s", 0) + now - started)


def read_record(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def append_history(run_dir: str, metrics: dict) -> None:
    if run_dir and "://" not in run_dir:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, HISTORY), "a") as f:
            f.write(json.dumps(metrics) + "\n")


def read_history(run_dir: str) -> list[dict]:
    """Per-epoch metrics in epoch order, the last record of each epoch (a resumed epoch runs again)."""
    by_epoch: dict[int, dict] = {}
    try:
        with open(os.path.join(run_dir, HISTORY)) as f:
            for line in f:
                try:
                    m = json.loads(line)
                except ValueError:
                    continue                         # a line cut short by a crash
                by_epoch[int(m.get("epoch", 0))] = m
    except OSError:
        return []
    return [by_epoch[k] for k in sorted(by_epoch)]


def guard_stop(error) -> str:
    """A guard's stop (`loop.TrainingStopped`: divergence, collapse, a bad-row share) as its one line, out of the
    worker traceback Ray wraps it in; "" for any other error."""
    found = re.findall(r"training stopped at [^\n]+", str(error))
    return found[-1].strip() if found else ""


def ended(error) -> dict:
    """The record fields for a run that ended with `error` (None: it finished)."""
    if error is None:
        return {"status": "finished", "reason": ""}
    stop = guard_stop(error)
    if stop:                                        # keep the guard's reason, not its advice on checkpoints
        return {"status": "stopped", "reason": stop.split(". ")[0].split(": ", 1)[-1]}
    text = str(error)
    # a worker's error arrives as its whole traceback: the last line names the exception
    last = next((line.strip() for line in reversed(text.strip().splitlines()) if line.strip()), type(error).__name__)
    return {"status": "failed", "reason": last[:200]}


def status(run_dir: str) -> dict:
    """One run: name, recipe, status and why, epochs done of planned, last and best kNN, wall time, path."""
    record, history = read_record(run_dir), read_history(run_dir)
    state = record.get("status", "unknown")
    if state == "running" and not lock_owner_alive(os.path.join(run_dir, LOCK_FILE)):
        state, record["reason"] = "interrupted", "its driver is gone (killed, or its machine lost)"
    knn = [m["knn_top1"] for m in history if "knn_top1" in m]
    wall = record.get("wall_s", 0) + (time.time() - record["started"] if state == "running" else 0)
    return {"name": os.path.basename(run_dir.rstrip("/")), "recipe": record.get("recipe", "?"), "status": state,
            "reason": record.get("reason", ""), "epochs": history[-1]["epoch"] if history else 0,
            "planned": record.get("epochs"), "last_knn": knn[-1] if knn else None,
            "best_knn": max(knn) if knn else None,
            "wall_s": wall if record.get("started") else None, "started": record.get("started", 0), "path": run_dir}


def list_runs(storage: str) -> list[dict]:
    """Every run directory under `storage` (one with a run.json or Ray checkpoints), oldest first."""
    dirs = [d for d in glob.glob(os.path.join(storage, "*")) if os.path.isdir(d) and (
        os.path.exists(os.path.join(d, RECORD)) or glob.glob(os.path.join(d, "checkpoint_*")))]
    runs = [status(d) for d in dirs]
    return sorted(runs, key=lambda r: r["started"])


def format_runs(runs: list[dict]) -> str:
    def pct(v):
        return f"{100 * v:.2f}%" if v is not None else "-"

    def wall(s):
        return "-" if s is None else f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else \
            f"{int(s // 60)}m{int(s % 60):02d}s"
    rows = [("run", "recipe", "status", "epochs", "last kNN", "best kNN", "wall", "path")]
    for r in runs:
        why = f" ({r['reason']})" if r["reason"] and r["status"] != "finished" else ""
        planned = f"/{r['planned']}" if r["planned"] else ""
        rows.append((r["name"], r["recipe"], r["status"] + why, f"{r['epochs']}{planned}", pct(r["last_knn"]),
                     pct(r["best_knn"]), wall(r["wall_s"]), r["path"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def add_commands(sub) -> None:
    s = sub.add_parser("runs", help="list the runs under a storage folder: status, epochs, kNN, wall time")
    s.add_argument("storage", nargs="?", help="the runs' folder (default: $SSLAB_STORAGE or ./runs)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=cmd_runs)


def cmd_runs(args) -> int:
    storage = resolve_storage(args.storage)
    if "://" in storage:
        print(f"[sslab] {storage}: `sslab runs` reads local run folders only")
        return 2
    runs = list_runs(storage)
    if args.json:
        print(json.dumps(runs, indent=1))
    elif not runs:
        print(f"[sslab] no runs under {storage}")
    else:
        print(format_runs(runs))
    return 0
