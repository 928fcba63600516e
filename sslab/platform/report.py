"""What a finished run prints: its final metrics, where its checkpoint and logs are."""
from __future__ import annotations

from .runs import guard_stop


def failure_line(error) -> str:
    """What the console says of a run that ended with `error`: a guard's stop (divergence, collapse, bad rows) in
    its one line; anything else, a bug, with the workers' tracebacks."""
    stop = guard_stop(error)
    return f"[sslab] {stop}" if stop else f"[sslab] run failed: {error}"


def summarize(result) -> int:
    """Print the last reported metrics of a Ray Train Result; return a process exit code."""
    if result.error:
        print(failure_line(result.error))
        return 1
    m = result.metrics or {}
    if not m:
        print(f"[sslab] nothing to do: the run at {result.path} had already finished (use a new --name)")
        return 0
    line = f"[sslab] finished {m.get('epoch')} epochs: loss {m.get('loss', float('nan')):.4f}"
    if "knn_top1" in m:
        pix = m.get("knn_top1_pixels", float("nan"))
        verdict = "beats" if m["knn_top1"] > pix else "does not beat"
        line += f"; kNN top-1 {100 * m['knn_top1']:.2f}% vs raw pixels {100 * pix:.2f}% ({verdict} the baseline)"
    print(line)
    if result.checkpoint:
        print(f"[sslab] last checkpoint: {result.checkpoint.path}")
    print(f"[sslab] run directory: {result.path}")
    return 0
