"""View specs and batched augmentation of uint8 image batches.

Every op works on a whole batch [N, C, H, W] with per-sample random parameters, so a Ray Data
`map_batches` call (or a training worker, on its own device) pays a handful of tensor passes instead of N PIL
round trips. Input and output are uint8; between ops the batch is float32 in [0, 255] (clamped after every colour
op, as torchvision does). The random numbers are a hash of (key, image index, view, draw) (`uniforms`), so a key
fixes the output, whichever batch, process or device makes it.

Differences from torchvision, on purpose:
- crop + resize is one bilinear `grid_sample` without antialiasing (like GPU augmentation
  libraries): it equals torchvision's `resized_crop(..., antialias=False)`; a crop shrunk by more
  than 2x aliases where torchvision's default antialias=True would low-pass first.
- hue is a rotation of the chroma plane in YIQ (one 3x3 matrix per sample; luma is kept) instead
  of an HSV round trip; `hue` keeps torchvision's meaning as a fraction of a full turn.
- 1-channel images: saturation, hue and grayscale are no-ops; brightness and contrast apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, the weights torchvision uses
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))      # RGB -> YIQ rows

def _hue_terms():
    """RGB -> RGB matrix of a hue rotation by angle a, as K + cos(a) C + sin(a) S: the 9 entries' (K, C, S)."""
    yiq = np.array(_YIQ)
    back = np.linalg.inv(yiq)
    keep, turn, swap = np.diag([1.0, 0, 0]), np.diag([0, 1.0, 1.0]), np.array([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    k, c, s = (back @ m @ yiq for m in (keep, turn, swap))
    return tuple(zip(k.ravel().tolist(), c.ravel().tolist(), s.ravel().tolist()))


_HUE = _hue_terms()


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation. Colour defaults are SimCLR's CIFAR recipe (Chen et al. 2020,
    appendix A: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with s=0.5), also MoCo v2's and BYOL's."""
    size: int                                      # output side (square), pixels
    scale: tuple[float, float] = (0.2, 1.0)        # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)    # crop aspect ratio (w / h) range
    flip_p: float = 0.5                            # horizontal flip probability
    jitter_p: float = 0.8                          # colour jitter probability
    brightness: float = 0.4                        # factor in [1-b, 1+b] (times strength)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1                               # rotation in [-h, h] turns (times strength)
    strength: float = 1.0                          # scales the four jitter magnitudes; 0 = off
    gray_p: float = 0.2
    blur_p: float = 0.0                            # gaussian blur, kernel ~10% of size (odd)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0                        # invert pixels >= 128 (BYOL's view 2)

    def __post_init__(self):
        for name in ("scale", "ratio", "blur_sigma"):                # YAML / Tune give lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if len(getattr(self, name)) != 2:
                raise ValueError(f"views.{name} must be a (lo, hi) pair, got {getattr(self, name)!r}")

        def bad(name, valid):
            raise ValueError(f"views.{name} must be {valid}, got {getattr(self, name)!r}")
        if not isinstance(self.size, int) or self.size < 1:
            bad("size", "an int >= 1")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "in [0, 1]")
        for name in ("brightness", "contrast", "saturation", "strength"):
            if getattr(self, name) < 0:
                bad(name, ">= 0")
        if not 0 <= self.hue * self.strength <= 0.5:
            bad("hue", "in [0, 0.5] after scaling by strength")
        for name, lo_ok in (("scale", 0 < self.scale[0]), ("ratio", 0 < self.ratio[0]),
                            ("blur_sigma", 0 < self.blur_sigma[0])):
            lo, hi = getattr(self, name)
            if not (lo_ok and lo <= hi and (name != "scale" or hi <= 1)):
                bad(name, "(lo, hi) with 0 < lo <= hi" + (" <= 1" if name == "scale" else ""))


@dataclass(frozen=True)
class ViewSet:
    """The views of a recipe: groups of (name, spec, count). Columns are numbered per name in
    order, e.g. view0, view1, local0..local5; every column has the fixed shape [C, size, size]."""
    groups: tuple[tuple[str, ViewSpec, int], ...]

    def __post_init__(self):
        for name, spec, count in self.groups:
            if not (name.isidentifier() and isinstance(spec, ViewSpec) and count >= 1):
                raise ValueError(f"views.groups: need (identifier, ViewSpec, count >= 1), "
                                 f"got {(name, spec, count)!r}")

    @property
    def views(self) -> tuple[tuple[str, ViewSpec], ...]:
        """(column, spec) per view, in column order."""
        seen: dict[str, int] = {}                                   # next index per name
        out = []
        for name, spec, count in self.groups:
            for _ in range(count):
                seen[name] = seen.get(name, -1) + 1
                out.append((f"{name}{seen[name]}", spec))
        return tuple(out)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(col for col, _ in self.views)

    def shapes(self, channels: int) -> dict[str, tuple[int, int, int]]:
        return {col: (channels, s.size, s.size) for col, s in self.views}


def two_views(size: int, strength: float = 1.0, blur_p: float = 0.0, min_scale: float = 0.2) -> ViewSet:
    """SimCLR / MoCo v2: two views from one spec."""
    return ViewSet((("view", ViewSpec(size, (min_scale, 1.0), strength=strength, blur_p=blur_p), 2),))


def asymmetric_views(size: int, strength: float = 1.0, min_scale: float = 0.2) -> ViewSet:
    """BYOL (Grill et al. 2020, table 6): view0 always blurred; view1 rarely blurred, sometimes solarized."""
    scale = (min_scale, 1.0)
    return ViewSet((("view", ViewSpec(size, scale, strength=strength, blur_p=1.0), 1),
                    ("view", ViewSpec(size, scale, strength=strength, blur_p=0.1, solarize_p=0.2), 1)))


def multi_crop(global_size: int, local_size: int, n_local: int, strength: float = 1.0,
               global_scale=(0.14, 1.0), local_scale=(0.05, 0.4)) -> ViewSet:
    """SwAV / DINO multi-crop: 2 global views + n_local small low-area crops (DINO's code
    defaults to global (0.4, 1); SwAV uses (0.14, 1))."""
    groups = [("view", ViewSpec(global_size, scale=tuple(global_scale), strength=strength), 2)]
    if n_local:
        groups.append(("local", ViewSpec(local_size, scale=tuple(local_scale), strength=strength), n_local))
    return ViewSet(tuple(groups))


# ---- randomness: a counter-based generator keyed by (run seed, epoch), counted by image and view ------------------
#
# Every random number of a view is a hash of (key, image index, view number, draw number): no generator state, so
# the views of an image do not depend on which batch, worker or device makes them, a resumed epoch replays the same
# views, and a batch's draws are one [N, DRAWS] tensor made on the batch's device by a few integer ops (no host
# round trip, no small host-to-device copies). The hash is a 32-bit integer mixer (two xor-shift-multiply rounds;
# constants from Wellons' hash-prospector, both below 2**31 so the int64 products never overflow).

DRAWS = 48                         # random numbers per image and view (slots below)
_TRIES = 10                        # crop attempts side by side, as torchvision's RandomResizedCrop
_AREA, _LOGR, _POS = 0, _TRIES, 2 * _TRIES                  # crop: area [10], log-ratio [10], top/left [2]
_FLIP, _JIT, _FAC, _ORDER = 22, 23, 24, 28                  # flip; jitter on; 4 factors; 4 order keys
_GRAYP, _BLUR, _SIGMA, _SOLAR = 32, 33, 34, 35
_M32 = 0xFFFFFFFF


def _mix(x):
    """32-bit mixer on int64 values in [0, 2**32): works elementwise on tensors and on Python ints alike."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def view_key(seed: int, epoch: int) -> int:
    """The key of one epoch's views in a run: a 32-bit int from the run seed and the epoch."""
    return _mix(_mix(_mix(seed & _M32) ^ ((seed >> 32) & _M32)) ^ (epoch & _M32))


def uniforms(key: int, index: torch.Tensor, view: int, n: int = DRAWS) -> torch.Tensor:
    """float32 [N, n] in [0, 1) on index's device: draw d of image index[i] in view `view` under `key`."""
    index = index.long()
    h = _mix(_mix((index & _M32) ^ key) ^ ((index >> 32) & _M32))                      # [N] per image
    ctr = torch.arange(view * DRAWS, view * DRAWS + n, device=index.device)               # per draw
    h = _mix(_mix(h[:, None] ^ ctr) ^ _mix(key ^ 0x5BD1E995))
    return (h >> 8).float() * (1.0 / (1 << 24))                                            # top 24 bits


def _between(u, lo, hi):
    return lo + (hi - lo) * u


# ---- crop ---------------------------------------------------------------------------------------

def sample_crop_boxes(u: torch.Tensor, h: int, w: int, scale, ratio) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for N samples at once from their uniforms u [N, >= 22] -> long
    [N, 4] of (top, left, height, width). The 10 tries run side by side; each sample keeps its first valid try,
    else the same center-crop fallback as torchvision."""
    u = u.double()
    area = _between(u[:, _AREA:_AREA + _TRIES], *scale) * (h * w)
    aspect = _between(u[:, _LOGR:_LOGR + _TRIES], math.log(ratio[0]), math.log(ratio[1])).exp()
    cw, ch = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()      # [N, tries]
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)                           # first valid try
    cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], ok.any(1)
    if w / h < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif w / h > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    cw, ch = torch.where(found, cw, float(fw)), torch.where(found, ch, float(fh))
    top = torch.where(found, (u[:, _POS] * (h - ch + 1)).floor(), ((h - ch) // 2))
    left = torch.where(found, (u[:, _POS + 1] * (w - cw + 1)).floor(), ((w - cw) // 2))
    return torch.stack([top, left, ch, cw], 1).long()


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Resized crop of each box (+ horizontal flip where `flip`) in one bilinear grid_sample.
    x float [N,C,H,W], boxes long [N,4], flip bool [N] (both on x's device) -> float [N,C,size,size]."""
    n, c, h, w = x.shape
    top, left, ch, cw = boxes.to(torch.float32).T[..., None]                      # [N, 1] each
    # output pixel centres in normalised coords (align_corners=False: pixel edge 0 -> -1, edge W -> +1); the map
    # is axis-aligned, so x depends on the column only and y on the row: two [N, size] rows, not an [N,s,s] bmm
    base = (2 * torch.arange(size, device=x.device, dtype=torch.float32) + 1) / size - 1
    gx = torch.where(flip[:, None], -base, base) * (cw / w) + (2 * left + cw) / w - 1
    gy = base * (ch / h) + (2 * top + ch) / h - 1
    # keep samples inside the box (its first/last pixel centres): an upscaled crop then replicates
    # its own edge, as torchvision's resize of the cropped image does, instead of reading outside
    gx = gx.clamp((2 * left + 1) / w - 1, (2 * (left + cw) - 1) / w - 1)
    gy = gy.clamp((2 * top + 1) / h - 1, (2 * (top + ch) - 1) / h - 1)
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---- pure per-op functions: float [n,C,H,W] in [0,255], per-sample factor [n] ----------------------

def grayscale(x):
    """Luma [n,1,H,W]; a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    return sum(wt * x[:, i:i + 1] for i, wt in enumerate(_GRAY))


def adjust_brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 255)


def _blend(x, y, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * y).clamp(0, 255)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return x if x.shape[1] == 1 else _blend(x, grayscale(x), f)


def adjust_hue(x, turns):
    """Rotate (I, Q) by 2*pi*turns in YIQ space; Y (luma) is kept: one 3x3 RGB matrix per sample, made from Python
    float constants (`_HUE`) and the sample's cos/sin, so nothing is copied to the device."""
    if x.shape[1] == 1:
        return x
    a = 2 * math.pi * turns.float()
    cos, sin = a.cos(), a.sin()
    m = torch.stack([k + c * cos + s * sin for k, c, s in _HUE], 1).view(-1, 3, 3)      # [n, 3, 3]
    return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 255)


def solarize(x):
    """Invert pixels that round to >= 128 (x is float, rounded to uint8 at the very end)."""
    return torch.where(x >= 127.5, 255 - x, x)


def blur_kernel_size(size: int) -> int:
    return max(3, round(0.1 * size) // 2 * 2 + 1)                   # odd, ~10% of the side


def gaussian_blur(x, sigma, k: int):
    """Separable blur with a per-sample sigma [n]: one grouped conv (groups = n*C) per axis over
    the batch folded into channels, reflect padding (torchvision's border mode)."""
    n, c, h, w = x.shape
    t = torch.arange(k, dtype=torch.float32, device=x.device) - k // 2
    ker = torch.exp(-t ** 2 / (2 * sigma.view(-1, 1).float() ** 2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x)  # [n*C, k]
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, ker.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, ker.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


# ---- the pipeline -------------------------------------------------------------------------------

def _masked(x, on, fn, blend: bool):
    """fn applied to the samples where `on` (bool [n]). Without `blend` only those are computed (the CPU's way);
    with it every sample is computed and blended, which needs no host sync (picking rows by a mask reads its count
    back to the host: a sync on a GPU)."""
    if not blend:
        idx = on.nonzero()[:, 0]
        if len(idx):
            x[idx] = fn(x[idx], idx)
        return x
    return torch.where(on.view(-1, 1, 1, 1), fn(x, slice(None)), x)


def _jitter(x, spec, u, blend):
    """Colour jitter in a per-sample random order (as torchvision's ColorJitter), on where u[:, _JIT] < jitter_p."""
    s = spec.strength
    mags = (spec.brightness * s, spec.contrast * s, spec.saturation * s, spec.hue * s)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    if spec.jitter_p == 0 or not any(mags):
        return x
    facs = [_between(u[:, _FAC + i], max(0.0, 1 - m), 1 + m) for i, m in enumerate(mags[:3])]
    facs.append(_between(u[:, _FAC + 3], -mags[3], mags[3]))
    order = u[:, _ORDER:_ORDER + 4].argsort(1)                       # [n, 4]: op at each position
    on = u[:, _JIT] < spec.jitter_p
    for k in range(4):
        for op in range(4):
            if mags[op]:
                x = _masked(x, on & (order[:, k] == op), lambda y, i, op=op: ops[op](y, facs[op][i]), blend)
    return x


def augment(images: torch.Tensor, spec: ViewSpec, u: torch.Tensor, blend: bool | None = None) -> torch.Tensor:
    """uint8 [N,C,H,W] -> uint8 [N,C,size,size]: crop+flip, jitter, grayscale, blur, solarize, with the random
    numbers u [N, DRAWS] (see `uniforms`) on the images' device. `blend` (default: off the CPU) computes the
    random ops for every sample and keeps them where drawn: no host sync, same output."""
    n, c, h, w = images.shape
    blend = images.device.type != "cpu" if blend is None else blend
    boxes = sample_crop_boxes(u, h, w, spec.scale, spec.ratio)
    x = crop_flip(images.float(), boxes, u[:, _FLIP] < spec.flip_p, spec.size)
    x = _jitter(x, spec, u, blend)
    if c == 3:
        x = _masked(x, u[:, _GRAYP] < spec.gray_p, lambda y, i: grayscale(y).expand(-1, 3, -1, -1), blend)
    if spec.blur_p:
        k, sigma = blur_kernel_size(spec.size), _between(u[:, _SIGMA], *spec.blur_sigma)
        x = _masked(x, u[:, _BLUR] < spec.blur_p, lambda y, i: gaussian_blur(y, sigma[i], k), blend)
    if spec.solarize_p:
        x = _masked(x, u[:, _SOLAR] < spec.solarize_p, lambda y, i: solarize(y), blend)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def make_views(images, viewset: ViewSet, key: int, index=None, blend: bool | None = None) -> dict[str, torch.Tensor]:
    """Every view of `viewset` for a batch: uint8 [N,C,H,W] (tensor on any device, or numpy) -> {column: uint8
    [N,C,s,s]} on the images' device. The views are a function of (key, index, image) only: `index` (int64 [N],
    default 0..N-1) names each image, `key` the run and epoch (`view_key`), so any batching or device gives the
    same views for the same rows (exactly on the CPU). `blend`: see `augment`."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"make_views needs uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
    if index is None:
        index = torch.arange(len(images), device=images.device)
    index = torch.as_tensor(index, device=images.device)
    return {col: augment(images, spec, uniforms(key, index, v), blend) for v, (col, spec) in enumerate(viewset.views)}


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float on x's device, per-channel (x/255 - mean) / std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().div(255).sub(mean).div(std)


def view_grid(views: list[torch.Tensor], n: int = 8) -> torch.Tensor:
    """uint8 [3, H, W] image for TensorBoard: row i = image i, columns = its views, each view
    zero-padded (bottom/right) to the largest size."""
    from torchvision.utils import make_grid
    views = [torch.as_tensor(v[:n]).cpu() for v in views]           # numpy batches and device tensors welcome
    s = max(v.shape[-1] for v in views)
    padded = [F.pad(v[:n], (0, s - v.shape[-1], 0, s - v.shape[-2])) for v in views]
    tiles = torch.stack(padded, 1).flatten(0, 1)                   # [n*V, C, s, s], image-major
    return make_grid(tiles, nrow=len(views), padding=2)


if __name__ == "__main__":                                         # python -m sslab.datasets.views
    import time
    from torchvision.transforms import v2

    torch.set_num_threads(1)
    for c, size in ((1, 28), (3, 32)):
        imgs = torch.randint(0, 256, (256, c, size, size), dtype=torch.uint8)
        spec = ViewSpec(size)
        tv = v2.Compose([v2.RandomResizedCrop(size, spec.scale, spec.ratio), v2.RandomHorizontalFlip(),
                         v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                         v2.RandomGrayscale(0.2)])

        def bench(fn, reps=5):
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return reps * len(imgs) / (time.perf_counter() - t)
        ours = bench(lambda: make_views(imgs, two_views(size), 0))
        ref = bench(lambda: [tv(im) for im in imgs for _ in range(2)])
        print(f"C={c} {size}px, two views, 1 thread: batched {ours:,.0f} img/s, "
              f"per-image torchvision.v2 {ref:,.0f} img/s, ratio {ours / ref:.1f}x")
