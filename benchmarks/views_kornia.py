"""Throughput benchmark: sslab's batched view augmentation (`sslab.datasets.views.make_views`) next to
kornia.augmentation's batch augmentation (per-sample random parameters) built to the same `ViewSpec`s, on the same
view sets and the same uint8 batches, measured in one run with interleaved reps (sslab, kornia, sslab, kornia, ...).

Both sides do the same job: uint8 [N,C,H,W] images in, every view of every image out as uint8 [N,C,s,s]. The
kornia side therefore includes uint8 -> float/255 at the start (once per batch, shared by all views) and
*255 -> round -> clamp -> uint8 at the end of each view. Throughput is images in per second (each image producing
all the views of the set). Rows: two_views(32, blur_p=0.5), asymmetric_views(32) (BYOL), multi_crop(32, 16, 6) on
3-channel 32x32 batches, two_views(28) on 1-channel 28x28; on the CPU (torch.set_num_threads(--threads)) and on
CUDA when available (synchronized around each rep). Medians over the reps; ratio = sslab / kornia.

    .venv/bin/python benchmarks/views_kornia.py --smoke                      # seconds: batch 16, 2 reps
    .venv/bin/python benchmarks/views_kornia.py --batch 256 --reps 10 --threads 1 --out views_kornia.json

Needs `pip install kornia` (not a dependency of sslab).

How each ViewSpec field maps to kornia.augmentation (pipeline order is sslab's: crop+flip, jitter, gray, blur,
solarize), and the semantic differences between the two:
- size/scale/ratio -> RandomResizedCrop((s, s), scale, ratio, align_corners=False). kornia's default "slice" mode
  crops by index and resizes with F.interpolate(bilinear, antialias=False): the same as torchvision's
  resized_crop(..., antialias=False), which is what sslab's single grid_sample computes (neither antialiases a
  crop shrunk by more than 2x). Both draw the crop box as torchvision does (10 area/log-ratio tries side by side,
  first one that fits, else a center-crop fallback).
- flip_p -> RandomHorizontalFlip(p=flip_p).
- brightness/contrast/saturation/hue * strength, jitter_p -> ColorJitter(b, c, s, h, p=jitter_p). kornia's
  ColorJitter uses torchvision's formulas (brightness multiplies, contrast blends with the grayscale mean,
  saturation blends with the grayscale, hue is an HSV shift in turns, clamp to [0, 1] after each step); kornia's
  ColorJiggle uses kornia's own primitives instead (additive brightness, contrast scales raw values, saturation
  scales HSV S), so ColorJitter is the torchvision-matching one and the one used here. Differences that remain:
  * order: kornia draws ONE random order of the four steps per call, shared by the whole batch; torchvision
    draws one per image, and so does sslab (per sample, from its hash).
  * hue: kornia (like torchvision) shifts H in HSV; sslab rotates the chroma plane in YIQ (luma kept).
  * 1 channel: kornia's saturation/hue steps need 3 channels and raise; sslab treats them as no-ops on 1 channel.
    The 1-channel row first tries the literal pipeline; if it raises, it says so and uses ColorJitter(b, c, 0, 0),
    which is exactly sslab's 1-channel semantics (brightness and contrast only).
- gray_p -> RandomGrayscale(p=gray_p), 3-channel only (sslab skips it on 1 channel). kornia's luma weights are
  (0.299, 0.587, 0.114); sslab uses torchvision's (0.2989, 0.587, 0.114).
- blur_p, blur_sigma -> RandomGaussianBlur(blur_kernel_size(size), blur_sigma, border_type="reflect",
  separable=True, p=blur_p): per-sample sigma, reflect border, separable, as sslab.
- solarize_p -> RandomSolarize(thresholds=(0.5, 0.5), additions=(0.0, 0.0), p=solarize_p): a scalar `thresholds`
  is a half-width around 0.5 (random threshold), so the fixed 0.5 threshold needs the degenerate pair; kornia
  inverts pixels >= threshold, sslab pixels >= 127.5 of 255: the same pixels.
- randomness: sslab's draws are a hash of (key, image index, view), on the batch's device; kornia samples its
  parameters with torch's global generator (on the CPU by default), then applies them. Both pick the samples an op
  applies to by index on the CPU; kornia also does so on CUDA (host syncs), where sslab blends instead.
The views are random either way: this benchmark compares speed, not pixels.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn as nn

from sslab.datasets.views import ViewSpec, asymmetric_views, blur_kernel_size, make_views, multi_crop, two_views

# (label, view set, channels, image side)
CASES = (
    ("two_views(32, blur_p=0.5)", two_views(32, blur_p=0.5), 3, 32),
    ("asymmetric_views(32)", asymmetric_views(32), 3, 32),
    ("multi_crop(32, 16, 6)", multi_crop(32, 16, 6), 3, 32),
    ("two_views(28) 1ch", two_views(28), 1, 28),
)


def kornia_pipeline(spec: ViewSpec, channels: int, reduced_jitter: bool = False) -> nn.Sequential:
    """The kornia.augmentation equivalent of one ViewSpec, float [0,1] in and out (see the module docstring).
    `reduced_jitter`: ColorJitter without saturation and hue (sslab's 1-channel semantics)."""
    import kornia.augmentation as K

    s = spec.strength
    sat, hue = (0.0, 0.0) if reduced_jitter else (spec.saturation * s, spec.hue * s)
    ops: list[nn.Module] = [
        K.RandomResizedCrop((spec.size, spec.size), scale=spec.scale, ratio=spec.ratio, align_corners=False),
        K.RandomHorizontalFlip(p=spec.flip_p),
    ]
    if spec.jitter_p and any((spec.brightness * s, spec.contrast * s, sat, hue)):
        ops.append(K.ColorJitter(spec.brightness * s, spec.contrast * s, sat, hue, p=spec.jitter_p))
    if channels == 3 and spec.gray_p:
        ops.append(K.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p:
        ops.append(K.RandomGaussianBlur(blur_kernel_size(spec.size), spec.blur_sigma, border_type="reflect",
                                        separable=True, p=spec.blur_p))
    if spec.solarize_p:
        ops.append(K.RandomSolarize(thresholds=(0.5, 0.5), additions=(0.0, 0.0), p=spec.solarize_p))
    return nn.Sequential(*ops)


def kornia_views(viewset, channels: int, device) -> tuple[object, str | None]:
    """fn(images uint8) -> {column: uint8}, and a note when the literal pipeline had to be reduced."""
    note = None
    pipes = {col: kornia_pipeline(spec, channels).to(device) for col, spec in viewset.views}
    probe = torch.rand(2, channels, 8, 8, device=device)
    try:
        for p in pipes.values():
            p(probe)
    except Exception as e:                                          # noqa: BLE001 - reported, then worked around
        note = (f"kornia full ColorJitter unsupported on {channels}-channel input ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:80]}); kornia row uses ColorJitter(b, c, 0, 0) = sslab's 1-channel "
                f"semantics")
        pipes = {col: kornia_pipeline(spec, channels, reduced_jitter=True).to(device) for col, spec in viewset.views}
        for p in pipes.values():
            p(probe)                                                # still failing: let it raise

    def fn(images):
        x = images.float().div_(255)                                # once per batch, shared by the views
        return {col: p(x).mul_(255).round_().clamp_(0, 255).to(torch.uint8) for col, p in pipes.items()}
    return fn, note


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def run_case(label, viewset, channels, side, device, batch, reps, warmup):
    images = torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8, device=device)
    kfn, note = kornia_views(viewset, channels, device)
    key = [0]

    def sslab_fn():
        key[0] += 1                                                 # a fresh epoch key per call
        return make_views(images, viewset, key[0])

    def kornia_fn():
        return kfn(images)

    a, b = sslab_fn(), kornia_fn()                                  # same job: same columns, shapes, dtype
    assert {c: (v.shape, v.dtype) for c, v in a.items()} == {c: (v.shape, v.dtype) for c, v in b.items()}, label
    for _ in range(warmup):
        sslab_fn()
        kornia_fn()
    ts, tk = [], []
    for _ in range(reps):                                           # interleaved: A, B, A, B, ...
        ts.append(timed(sslab_fn, device))
        tk.append(timed(kornia_fn, device))
    s_ips, k_ips = batch / statistics.median(ts), batch / statistics.median(tk)
    return {"device": device.type, "viewset": label, "channels": channels, "side": side,
            "views": len(viewset.views), "batch": batch, "reps": reps,
            "sslab_img_s": s_ips, "kornia_img_s": k_ips, "ratio": s_ips / k_ips,
            "sslab_s": ts, "kornia_s": tk, "note": note}


def machine_info(threads: int) -> dict:
    import kornia

    info = {"torch": torch.__version__, "kornia": kornia.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_threads": threads, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="batch 16, 2 reps, 1 warm-up: a few seconds")
    ap.add_argument("--out", help="write the results + machine info as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.reps, args.warmup = 16, 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)                                            # kornia's parameters
    info = machine_info(args.threads)
    print(f"torch {info['torch']}, kornia {info['kornia']}, {info['cpu_count']} CPUs, {args.threads} thread(s), "
          f"batch {args.batch}, {args.reps} reps (median), img/s = images in, all views of each")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    print(f"{'device':6} {'view set':26} {'views':>5} {'sslab img/s':>12} {'kornia img/s':>13} {'ratio':>7}")
    for device in devices:
        for label, viewset, channels, side in CASES:
            r = run_case(label, viewset, channels, side, device, args.batch, args.reps, args.warmup)
            rows.append(r)
            print(f"{r['device']:6} {label:26} {r['views']:>5} {r['sslab_img_s']:>12,.0f} "
                  f"{r['kornia_img_s']:>13,.0f} {r['ratio']:>6.2f}x" + ("  *" if r["note"] else ""), flush=True)
    for note in dict.fromkeys(r["note"] for r in rows if r["note"]):
        print(f"* {note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
