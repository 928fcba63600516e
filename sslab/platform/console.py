"""What a person sees while a run trains: sslab's own lines and one progress bar per epoch, printed by the driver.

Rank 0's loop sends its lines and progress to the run's small `RunLog` actor; a thread in the driver takes them every
half second and prints them: a tqdm bar on a terminal, plain lines every engine.log_every steps and at an epoch's
last step otherwise (a pipe, a log file, `ray job submit`). Workers' own output is not forwarded and the driver's stderr (Ray's warnings, its C++
log lines, its tracebacks about internal actors) goes to RUN_DIR/ray.log, unless `--verbose`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from ..datasets.pipeline import BadRows


class RunLog(BadRows):
    """The run's one small actor: the training rows the stream skipped (`BadRows`), and the events of rank 0 until
    the driver takes them: ("line", text) or ("progress", dict)."""

    def __init__(self):
        super().__init__()
        self.items: list = []

    def put(self, item) -> None:
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items


def eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class View:
    """Prints lines and progress events. `progress` dicts hold epoch, epochs, step, steps, loss, lr, rate
    (images/s), batch (global) and log_every."""

    def __init__(self, out=None, tty: bool | None = None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.bar = None

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def progress(self, p: dict) -> None:
        left = (p["steps"] - p["step"]) * p["batch"] / max(p["rate"], 1e-9)
        if not self.tty:
            if p["step"] % p["log_every"] == 0 or p["step"] == p["steps"]:
                self.line(f"[sslab] epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} "
                          f"loss {p['loss']:.4f} lr {p['lr']:.4g} {p['rate']:.0f} img/s, epoch ETA {eta(left)}")
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.desc != f"epoch {p['epoch']}/{p['epochs']}":
            self.close_bar()
            self.bar = tqdm(total=p["steps"], desc=f"epoch {p['epoch']}/{p['epochs']}", file=self.out,
                            unit="step", dynamic_ncols=True, leave=False)
        self.bar.set_postfix_str(f"loss {p['loss']:.4f} lr {p['lr']:.3g} {p['rate']:.0f} img/s", refresh=False)
        self.bar.update(p["step"] - self.bar.n)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def show(self, items: list) -> None:
        for kind, value in items:
            if kind == "line":
                if " done:" in value:       # an epoch's summary ends its bar
                    self.close_bar()
                self.line(value)
            else:
                self.progress(value)


@contextlib.contextmanager
def quiet_stderr(path: str, enabled: bool):
    """Send this process's error output to `path` while the run trains: file descriptor 2 (Ray's C++ log lines),
    `sys.stderr` (warnings) and the streams of Ray's Python loggers (they keep the stderr object they were created
    with, which in a notebook or under pytest is not descriptor 2). sslab's own lines go to stdout."""
    if not enabled:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a", buffering=1) as f:
        os.dup2(f.fileno(), 2)
        handlers = [h for h in _stream_handlers() if type(h).__module__.startswith("ray")]   # Ray's own only
        streams = [h.stream for h in handlers]
        for h in handlers:
            _point(h, f)
        try:
            with contextlib.redirect_stderr(f):
                yield
        finally:
            for h, stream in zip(handlers, streams):
                _point(h, stream)
            for h in _stream_handlers():          # any made during the run took the redirected stderr
                if h.stream is f:
                    _point(h, sys.stderr)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _stream_handlers() -> list:
    """The console handlers of every logger (a file handler is not one)."""
    import logging

    loggers = [logging.root] + [lg for lg in list(logging.root.manager.loggerDict.values())
                                if isinstance(lg, logging.Logger)]
    return list({id(h): h for lg in loggers for h in lg.handlers
                 if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}.values())


def _point(handler, stream) -> None:
    """Give a handler another stream without flushing its old one (which may be closed)."""
    handler.acquire()
    try:
        handler.stream = stream
    finally:
        handler.release()


@contextlib.contextmanager
def driver_console(actor, view: View | None = None, every: float = 0.5):
    """A thread printing what the run's `RunLog` actor receives, every `every` seconds while the run trains;
    whatever is left is printed when it ends."""
    import ray

    view = view or View()
    done = threading.Event()

    def take() -> bool:
        try:
            view.show(ray.get(actor.take.remote()))
            return True
        except ray.exceptions.RayActorError as e:   # its node lost: training goes on, its console lines do not
            view.line(f"[sslab] the run's console messages stopped: {str(e).strip().splitlines()[0]}")
        except Exception as e:                      # the console itself failed (a closed pipe): never the run
            print(f"[sslab] console stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return False

    def pump():
        while not done.wait(every) and take():
            pass

    thread = threading.Thread(target=pump, name="sslab-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        take()
        view.close_bar()


class Sender:
    """The worker's end: rank 0 sends lines and (at most every `every` seconds, and at log_every steps) progress
    to the `RunLog` actor named `name`, without waiting for it."""

    def __init__(self, name: str, every: float = 0.5):
        import ray

        self.actor, self.every, self.last = ray.get_actor(name), every, 0.0

    def line(self, text: str) -> None:
        self.actor.put.remote(("line", text))

    def progress(self, p: dict) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or p["step"] % p["log_every"] == 0 or p["step"] == p["steps"]:
            self.last = now
            self.actor.put.remote(("progress", p))
