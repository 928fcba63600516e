"""Ray's local processes end with the driver that started them, even when it is killed.

A local Ray started by `ray.init` runs its daemons (GCS, raylet, dashboard, log monitor, ...) as children of the
driver; they notice a driver killed with SIGKILL only after a minute or two, and keep their ports open meanwhile.
`watch()` starts a small process (`python -m sslab.platform.reaper NODE DRIVER PID:START ...`) that polls the
driver and, once it is gone, stops those daemons, everything under them and the processes of the run's Ray node
(agents, workers): SIGTERM, then SIGKILL two seconds later.
Each process is named with its start time (from /proc), so a pid the system has since reused is left alone.
Linux only (it reads /proc); elsewhere `watch()` does nothing.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone (or a
    zombie: dead, waiting for its parent to collect it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):   # gone since the listing
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    return out


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid`."""
    return [p for p, parent in _parents().items() if parent == pid]


def _descendants(pids) -> set[int]:
    """Every process under `pids` (children, their children, ...)."""
    parents, found, todo = _parents(), set(), list(pids)
    while todo:
        p = todo.pop()
        for child in (c for c, parent in parents.items() if parent == p and c not in found):
            found.add(child)
            todo.append(child)
    return found


def _of_node(node: str) -> set[int]:
    """Pids of the processes the raylet of Ray node `node` started (agents, workers): they carry RAY_NODE_ID."""
    want, out = f"RAY_NODE_ID={node}".encode() + b"\0", set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):                             # gone, or not ours to read
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if want in f.read() + b"\0":
                        out.add(int(entry))
    return out


def _is_ray(pid: int) -> bool:
    """Whether the process is one of Ray's (its command line names Ray's binaries or package)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return any(k in cmd for k in (b"gcs_server", b"raylet", b"/ray/", b"ray::"))


def _same(pid: int, start: int) -> bool:
    return start_time(pid) == start


def watch(node: str, driver: int | None = None) -> subprocess.Popen | None:
    """Start the reaper for the driver's Ray child processes and the processes of Ray node `node` (call it right
    after a local `ray.init`); other children of the driver are never touched."""
    if not os.path.isdir("/proc/self"):
        return None
    driver = driver or os.getpid()
    daemons = [pid for pid in _children(driver) if _is_ray(pid)]
    # the tree as it is now too: a driver killed within a second could take the daemons with it before the reaper
    # has looked, orphaning their helpers (whose environment Ray may since have overwritten with its titles)
    named = [f"{pid}:{start}" for pid, start in sorted(_noted(daemons)) + sorted(_noted(_descendants(daemons)))]
    if not named:
        return None
    return subprocess.Popen([sys.executable, "-m", "sslab.platform.reaper", node, f"{driver}:{start_time(driver)}",
                             *named],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)     # outlives a Ctrl-C or kill of the driver's process group


def _noted(pids) -> set[tuple[int, int]]:
    """(pid, start time) of the pids still running."""
    return {(p, s) for p, s in ((p, start_time(p)) for p in pids) if s is not None}


def reap(driver: tuple[int, int], named: list[tuple[int, int]], node: str = "", poll: float = 0.2,
         grace: float = 2.0) -> list[int]:
    """Wait for `driver` (pid, start) to end, then stop the `named` processes, everything seen under them (the
    dashboard's helpers; a process orphaned when its parent dies is no longer under it, so the tree is noted
    every 10 polls) and the processes of Ray node `node` (the raylet's agents and workers: some daemons die with the
    driver and orphan them at once). The named daemons go first, so none is left to start a helper again; a
    SIGTERM round, then SIGKILL rounds for whatever is left or new. Returns the pids signalled: none when the named
    processes end while the driver lives (it shut its Ray down), and then the reaper ends too."""
    tracked = {(p, s) for p, s in named}
    for n in itertools.count():
        if n % 10 == 0:                                 # the tree every 2 s: a scan of /proc is the costly part
            tracked |= _noted(_descendants(p for p, s in tracked if _same(p, s)))
        if not _same(*driver):
            break
        if n % 10 == 0 and not any(_same(p, s) for p, s in named):   # the driver shut its Ray down
            return []
        time.sleep(poll)
    signalled: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        tracked |= _noted(_of_node(node)) if node else set()
        tracked |= _noted(_descendants(p for p, s in tracked if _same(p, s)))
        alive = [(p, s) for p, s in named if _same(p, s)]
        alive += sorted((p, s) for p, s in tracked - set(named) if _same(p, s))
        if not alive:
            break
        for pid, _ in alive:
            with contextlib.suppress(ProcessLookupError):                 # ended meanwhile
                os.kill(pid, sig)
                signalled.add(pid)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_same(p, s) for p, s in alive):
            time.sleep(0.1)
    return sorted(signalled)


if __name__ == "__main__":
    pairs = [tuple(int(x) for x in arg.split(":")) for arg in sys.argv[2:]]
    reap(pairs[0], pairs[1:], sys.argv[1])
