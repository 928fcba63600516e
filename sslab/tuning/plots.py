"""A scatter plot as a PNG, drawn with Pillow (a dependency already): kNN top-1 against one knob per figure."""
from __future__ import annotations

import math

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 420, 70, 20, 40, 60


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:  # 1-2-5 steps per decade
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return [m * 10.0 ** e for e in range(a, b + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi] or [lo, hi]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def scatter_png(path: str, points: list[tuple], *, title: str, xlabel: str, ylabel: str, log: bool = False) -> None:
    """points: (x, y, style) with x a number or a category label and style "done" (a filled dot), "stopped"
    (hollow: stopped early) or "failed" (a cross). A log x-axis needs positive numbers."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 12), title, fill="black")
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    d.rectangle([x0, y1, x1, y0], outline="black")
    numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for p in points)
    if numeric and points:
        xs = [math.log10(p[0]) if log else p[0] for p in points]
        lo, hi = min(xs), max(xs)
        lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        fx = lambda v: x0 + (x1 - x0) * ((math.log10(v) if log else v) - lo) / (hi - lo)
        xticks = [(fx(t), f"{t:.3g}") for t in _ticks(10 ** lo if log else lo, 10 ** hi if log else hi, log)]
    else:
        cats = sorted({str(p[0]) for p in points})
        fx = lambda v: x0 + (x1 - x0) * (cats.index(str(v)) + 0.5) / len(cats)
        xticks = [(fx(c), c) for c in cats]
    ys = [p[1] for p in points] or [0.0, 1.0]
    ylo, yhi = min(ys), max(ys)
    ylo, yhi = (ylo - 0.05, yhi + 0.05) if ylo == yhi else (ylo - 0.05 * (yhi - ylo), yhi + 0.05 * (yhi - ylo))
    fy = lambda v: y0 - (y0 - y1) * (v - ylo) / (yhi - ylo)
    for px, label in xticks:
        d.line([px, y0, px, y0 + 4], fill="black")
        d.text((px - 3 * len(label), y0 + 8), label, fill="black")
    for t in _ticks(ylo, yhi, False):
        d.line([x0 - 4, fy(t), x0, fy(t)], fill="black")
        d.text((8, fy(t) - 6), f"{t:.3f}", fill="black")
    d.text(((x0 + x1) // 2 - 3 * len(xlabel), H - 24), xlabel, fill="black")
    d.text((LEFT, TOP - 14), ylabel, fill="black")
    for x, y, style in points:
        cx, cy = fx(x), fy(y)
        if style == "failed":
            d.line([cx - 5, cy - 5, cx + 5, cy + 5], fill="firebrick", width=2)
            d.line([cx - 5, cy + 5, cx + 5, cy - 5], fill="firebrick", width=2)
        else:
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline="navy", width=2,
                      fill="royalblue" if style == "done" else None)
    img.save(path)
