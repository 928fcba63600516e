"""The figures of sslab.plots on synthetic data: what each draws, and the PNGs they make."""
import math
import subprocess
import sys

import pytest
from PIL import Image

from sslab.plots import (Knob, SweepTrial, knob_figure, run_curves_figure, run_curves_png, save_png,
                         sweep_figure)


def lines(ax, prefix: str) -> dict:
    """The axes' Line2Ds whose gid starts with prefix, by the rest of their gid."""
    return {line.get_gid()[len(prefix):]: line for line in ax.lines if (line.get_gid() or "").startswith(prefix)}


def test_importing_the_module_leaves_matplotlib_unloaded():
    code = "import sys, sslab.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_curves_draw_one_subplot_per_metric_present(tmp_path):
    history = [{"epoch": e, "loss": 5.0 - e, "lr": 0.1 * e, "knn_top1": 0.2 * e, "knn_top1_pixels": 0.3,
                "alignment": 1.0 / e, "uniformity": -e, "effective_rank": 10.0 * e, "collapse_score": 0.1,
                "images_per_s": 900.0} for e in range(1, 5)]
    fig = run_curves_figure(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr", "knn_top1", "alignment", "uniformity",
                                                   "effective_rank", "collapse_score"]
    knn, pixels = fig.axes[2].lines
    assert list(knn.get_ydata()) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert pixels.get_linestyle() == "--" and list(pixels.get_ydata()) == [0.3] * 4

    path = run_curves_png(history, str(tmp_path / "run.png"))
    assert path == str(tmp_path / "run.png")
    with Image.open(path) as img:  # 7 panels: 3 columns of 400 pixels, 3 rows of 300
        assert img.format == "PNG" and img.size == (1200, 900)


def test_run_curves_skip_missing_keys_and_epochs_without_a_value(tmp_path):
    # kNN every other epoch (NaN or absent in between), no diagnostics, no pixel baseline
    history = [{"epoch": 1, "loss": 3.0, "lr": 0.1, "knn_top1": math.nan}, {"epoch": 2, "loss": 2.0, "lr": 0.2,
               "knn_top1": 0.5}, {"epoch": 3, "loss": 1.5, "lr": 0.1}, {"epoch": 4, "loss": 1.2, "lr": 0.0,
                                                                       "knn_top1": 0.6}]
    fig = run_curves_figure(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr", "knn_top1"]
    (knn,) = fig.axes[2].lines
    assert list(knn.get_xdata()) == [2, 4] and list(knn.get_ydata()) == [0.5, 0.6]
    with Image.open(run_curves_png(history, str(tmp_path / "run.png"))) as img:
        assert img.size == (1200, 300)
    assert [ax.get_title() for ax in run_curves_figure([{"epoch": 1, "loss": 1.0}]).axes] == ["loss"]
    with pytest.raises(ValueError, match="none of loss"):
        run_curves_figure([{"epoch": 1, "images_per_s": 10.0}])


TRIALS = [
    SweepTrial("t0", "done", [(1, 0.5), (2, 0.6), (3, 0.7)], {"lr": 0.01, "dim": 64}),
    SweepTrial("t1", "stopped", [(1, 0.3)], {"lr": 0.1, "dim": 128}),
    SweepTrial("t2", "failed", [(1, 0.4), (2, 0.2)], {"lr": 0.001, "dim": 64}),
    SweepTrial("t3", "done", [(1, 0.45), (2, 0.55), (3, 0.72)], {"lr": 0.02, "dim": 128}, exploits=[1]),
    SweepTrial("t4", "failed", [], {"lr": 0.05, "dim": 64}),  # failed before its first report: not drawn
]
KNOBS = [Knob("lr", "engine.base_lr", log=True), Knob("dim", "recipe.dim", categories=(64, 128, 256))]


def test_the_sweep_figure_draws_every_trial_its_end_and_its_exploits(tmp_path):
    fig = sweep_figure(TRIALS, KNOBS, title="sweep")
    curves, lr, dim = fig.axes
    drawn = lines(curves, "curve:")
    assert sorted(drawn) == ["t0", "t1", "t2", "t3"]
    assert len(drawn["t1"].get_xdata()) < len(drawn["t0"].get_xdata()) == 3  # stopped early: cut short
    ends = {gid: (line.get_marker(), line.get_fillstyle()) for gid, line in lines(curves, "").items()
            if gid.split(":")[0] in ("done", "stopped", "failed", "unfinished")}
    assert ends == {"done:t0": ("o", "full"), "stopped:t1": ("o", "none"), "failed:t2": ("x", "full"),
                    "done:t3": ("o", "full")}
    (star,) = lines(curves, "exploit:").values()
    assert star.get_marker() == "*" and list(star.get_xdata()) == [1] and list(star.get_ydata()) == [0.45]
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [
        "done", "stopped early", "failed", "PBT exploit (restarted from another trial)"]

    # one scatter per knob: the final score of each trial that reported one, grouped by status
    assert lr.get_xscale() == "log" and lr.get_xlabel() == "engine.base_lr"
    points = {gid: (list(line.get_xdata()), list(line.get_ydata())) for gid, line in lines(lr, "").items()}
    assert points == {"done": ([0.01, 0.02], [0.7, 0.72]), "stopped": ([0.1], [0.3]), "failed": ([0.001], [0.2])}
    assert [t.get_text() for t in dim.get_xticklabels()] == ["64", "128", "256"]  # the space's order, all choices
    assert list(lines(dim, "")["done"].get_xdata()) == [0, 1] and dim.get_xscale() == "linear"
    assert dim.get_shared_y_axes().joined(dim, curves)

    with Image.open(save_png(fig, str(tmp_path / "sweep.png"))) as img:  # one column of knobs beside the curves
        assert img.format == "PNG" and img.size == (1060, 560)


def test_many_knobs_stack_three_a_column_and_one_knob_stands_alone(tmp_path):
    knobs = [Knob("lr", f"knob {i}") for i in range(5)]
    fig = sweep_figure(TRIALS, knobs)
    assert len(fig.axes) == 6 and all(len(lines(ax, "")) == 3 for ax in fig.axes[1:])
    with Image.open(save_png(fig, str(tmp_path / "sweep.png"))) as img:
        assert img.size == (1420, 840)
    with Image.open(save_png(knob_figure(TRIALS, KNOBS[1]), str(tmp_path / "dim.png"))) as img:
        assert img.size == (640, 420)
