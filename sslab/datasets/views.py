"""View specs and batched augmentation of uint8 image batches.

Every op works on a whole batch [N, C, H, W] with per-sample random parameters, so a Ray Data
`map_batches` call pays a handful of tensor passes instead of N PIL round trips. Input and output
are uint8; between ops the batch is float32 in [0, 255] (clamped after every colour op, as
torchvision does). All randomness comes from one `torch.Generator`, so a seed fixes the output.

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
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    dtype=torch.float64)


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


# ---- crop ---------------------------------------------------------------------------------------

def _uniform(n, lo, hi, g, dtype=torch.float32):
    return torch.empty(n, dtype=dtype).uniform_(lo, hi, generator=g)


def sample_crop_boxes(n, h, w, scale, ratio, generator, tries: int = 10) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n samples at once -> long [n, 4] of
    (top, left, height, width). The 10 tries run side by side; each sample keeps its first
    valid try, else the same center-crop fallback as torchvision."""
    area = _uniform((n, tries), *scale, generator, torch.float64) * (h * w)
    logr = math.log(ratio[0]), math.log(ratio[1])
    aspect = _uniform((n, tries), *logr, generator, torch.float64).exp()
    cw, ch = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()      # [n, tries]
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
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (h - ch + 1)).floor(), ((h - ch) // 2))
    left = torch.where(found, (u[:, 1] * (w - cw + 1)).floor(), ((w - cw) // 2))
    return torch.stack([top, left, ch, cw], 1).long()


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Resized crop of each box (+ horizontal flip where `flip`) in one affine grid_sample.
    x float [N,C,H,W], boxes long [N,4], flip bool [N] -> float [N,C,size,size]."""
    n, c, h, w = x.shape
    top, left, ch, cw = boxes.to(torch.float32).T
    theta = torch.zeros(n, 2, 3)
    # normalised coords (align_corners=False): pixel edge 0 -> -1, edge W -> +1
    theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)        # [N,size,size,2] (x, y)
    # keep samples inside the box (its first/last pixel centres): an upscaled crop then replicates
    # its own edge, as torchvision's resize of the cropped image does, instead of reading outside
    lo = torch.stack([(2 * left + 1) / w, (2 * top + 1) / h], 1) - 1
    hi = torch.stack([(2 * (left + cw) - 1) / w, (2 * (top + ch) - 1) / h], 1) - 1
    grid = grid.clamp(lo.view(n, 1, 1, 2), hi.view(n, 1, 1, 2)).to(x.device)
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
    """Rotate (I, Q) by 2*pi*turns in YIQ space: one 3x3 matrix per sample; Y (luma) is kept."""
    if x.shape[1] == 1:
        return x
    a = 2 * math.pi * turns.double()
    rot = torch.zeros(len(a), 3, 3, dtype=torch.float64)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, a.cos(), a.cos()
    rot[:, 1, 2], rot[:, 2, 1] = -a.sin(), a.sin()
    m = (torch.linalg.inv(_YIQ) @ rot @ _YIQ).to(x)                  # [n, 3, 3] RGB -> RGB
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
    t = torch.arange(k, dtype=torch.float32) - k // 2
    ker = torch.exp(-t ** 2 / (2 * sigma.view(-1, 1).float() ** 2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x)  # [n*C, k]
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, ker.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, ker.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


# ---- the pipeline -------------------------------------------------------------------------------

def _where_p(x, p, g, fn):
    """Apply fn to the samples drawn with probability p (only those are computed)."""
    idx = (torch.rand(len(x), generator=g) < p).nonzero()[:, 0].to(x.device)
    if len(idx):
        x[idx] = fn(x[idx])
    return x


def _jitter(x, spec, g):
    s = spec.strength
    mags = (spec.brightness * s, spec.contrast * s, spec.saturation * s, spec.hue * s)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    if spec.jitter_p == 0 or not any(mags):
        return x

    def apply(y):
        m = len(y)
        facs = [_uniform(m, max(0.0, 1 - b), 1 + b, g) for b in mags[:3]] + [_uniform(m, -mags[3], mags[3], g)]
        order = torch.rand(m, 4, generator=g).argsort(1)             # per-sample op order, like torchvision
        for k in range(4):
            for op in range(4):
                sel = (order[:, k] == op).nonzero()[:, 0]
                if mags[op] and len(sel):
                    y[sel] = ops[op](y[sel], facs[op][sel].to(y.device))
        return y
    return _where_p(x, spec.jitter_p, g, apply)


def augment(images: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N,C,H,W] -> uint8 [N,C,size,size]: crop+flip, jitter, grayscale, blur, solarize."""
    n, c, h, w = images.shape
    g = generator
    boxes = sample_crop_boxes(n, h, w, spec.scale, spec.ratio, g)
    flip = (torch.rand(n, generator=g) < spec.flip_p).to(images.device)
    x = crop_flip(images.float(), boxes.to(images.device), flip, spec.size)
    x = _jitter(x, spec, g)
    if c == 3:
        x = _where_p(x, spec.gray_p, g, lambda y: grayscale(y).expand(-1, 3, -1, -1))
    k = blur_kernel_size(spec.size)
    x = _where_p(x, spec.blur_p, g, lambda y: gaussian_blur(y, _uniform(len(y), *spec.blur_sigma, g), k))
    x = _where_p(x, spec.solarize_p, g, lambda y: solarize(y))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def make_views(images, viewset: ViewSet, seed: int) -> dict[str, np.ndarray]:
    """The Ray Data map function's core: uint8 [N,C,H,W] -> {column: uint8 numpy [N,C,s,s]}."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"make_views needs uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
    g = torch.Generator().manual_seed(seed)
    return {col: augment(images, spec, g).cpu().numpy() for col, spec in viewset.views}


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float on x's device, per-channel (x/255 - mean) / std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().div(255).sub(mean).div(std)


def view_grid(views: list[torch.Tensor], n: int = 8) -> torch.Tensor:
    """uint8 [3, H, W] image for TensorBoard: row i = image i, columns = its views, each view
    zero-padded (bottom/right) to the largest size."""
    from torchvision.utils import make_grid
    views = [torch.as_tensor(v) for v in views]                     # numpy batches welcome too
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
