"""Batched view augmentation: shapes, exact identity/flip, crops against torchvision, each colour
op against an independent numpy reference, blur against a float64 loop convolution."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sslab.datasets import views as V

PLAIN = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def imgs(n=5, c=3, h=16, w=16, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed=0, n=64):
    """Random numbers for n images (the first n of `n`): V.uniforms under key `seed`."""
    return V.uniforms(seed, torch.arange(n), 0)


def close(a, b, levels=1):
    return (torch.as_tensor(a).int() - torch.as_tensor(b).int()).abs().max().item() <= levels


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("n", [1, 17])
def test_shape_and_dtype(c, n):
    spec = V.ViewSpec(12, blur_p=0.5, solarize_p=0.5)
    out = V.augment(imgs(n, c, 20, 24), spec, gen(0, n))
    assert out.shape == (n, c, 12, 12) and out.dtype == torch.uint8


@pytest.mark.parametrize("c", [1, 3])
def test_identity_and_flip_are_exact(c):
    x = imgs(4, c)
    assert close(V.augment(x, V.ViewSpec(16, **PLAIN), gen(0, len(x))), x, 0)
    assert close(V.augment(x, V.ViewSpec(16, **{**PLAIN, "flip_p": 1.0}), gen(0, len(x))), x.flip(-1), 0)


def test_crop_matches_torchvision_resized_crop():
    # Same boxes through torchvision's resized_crop (bilinear, antialias off: we sample a bilinear grid
    # and do not low-pass). Noise images are the worst case for any sampling mismatch.
    x = imgs(16, 3, 24, 20)
    boxes = V.sample_crop_boxes(gen(1, 16), 24, 20, (0.05, 1.0), (3 / 4, 4 / 3))
    assert (boxes[:, 3] < 16).any() and (boxes[:, 3] > 16).any()  # both up- and downscaled crops
    for flip in (False, True):
        ours = V.crop_flip(x.float(), boxes, torch.full((16,), flip), 16)
        for i, (t, l, h, w) in enumerate(boxes.tolist()):
            ref = TF.resized_crop(x[i].float(), t, l, h, w, [16, 16], antialias=False)
            ref = ref.flip(-1) if flip else ref
            assert (ours[i] - ref).abs().max() < 1e-2, (i, flip)


def test_boxes_respect_scale_and_ratio_and_fallback():
    h, w, scale, ratio = 800, 1000, (0.08, 0.5), (0.5, 2.0)
    t, l, bh, bw = V.sample_crop_boxes(gen(0, 2000), h, w, scale, ratio).double().T
    assert (t >= 0).all() and (l >= 0).all() and (t + bh <= h).all() and (l + bw <= w).all()
    area, aspect = bh * bw / (h * w), bw / bh
    assert area.min() >= scale[0] * 0.99 and area.max() <= scale[1] * 1.01  # sides rounded to pixels
    assert aspect.min() >= ratio[0] * 0.99 and aspect.max() <= ratio[1] * 1.01
    assert area.max() - area.min() > 0.3  # actually spread over the range
    # ratio (3, 4) cannot fit a square image at area >= 0.9: torchvision's center-crop fallback
    box = V.sample_crop_boxes(gen(0, 3), 30, 30, (0.9, 1.0), (3.0, 4.0))
    assert box.tolist() == [[(30 - 10) // 2, 0, 10, 30]] * 3


def test_grayscale_gives_equal_channels():
    out = V.augment(imgs(6), V.ViewSpec(16, **{**PLAIN, "gray_p": 1.0}), gen(0, 6))
    assert (out[:, 0] == out[:, 1]).all() and (out[:, 1] == out[:, 2]).all()
    ref = np.round(np.tensordot([0.2989, 0.587, 0.114], imgs(6).numpy().astype(np.float64), axes=([0], [1])))
    assert close(out[:, 0], ref)


def test_colour_ops_against_numpy():
    x = imgs(3, 3).float()
    xn = x.numpy().astype(np.float64)
    f = torch.tensor([0.5, 1.0, 1.7])
    fn = f.numpy().astype(np.float64)[:, None, None, None]
    gray = np.tensordot([0.2989, 0.587, 0.114], xn, axes=([0], [1]))[:, None]      # [n,1,H,W]
    np.testing.assert_allclose(V.adjust_brightness(x, f), np.clip(xn * fn, 0, 255), atol=1e-3)
    mean = gray.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(V.adjust_contrast(x, f), np.clip(fn * xn + (1 - fn) * mean, 0, 255), atol=1e-3)
    np.testing.assert_allclose(V.adjust_saturation(x, f), np.clip(fn * xn + (1 - fn) * gray, 0, 255), atol=1e-3)
    # hue: zero turns is identity, luma is kept (away from clamping), a half turn negates chroma
    mid = x * 0.25 + 96
    np.testing.assert_allclose(V.adjust_hue(mid, torch.zeros(3)), mid, atol=1e-3)
    h = V.adjust_hue(mid, torch.tensor([0.1, 0.25, 0.5]))
    np.testing.assert_allclose(V.grayscale(h), V.grayscale(mid), atol=1e-2)
    assert not np.allclose(h, mid, atol=1)
    np.testing.assert_allclose(h[2] - V.grayscale(h)[2], -(mid[2] - V.grayscale(mid)[2]), atol=0.05)
    # 1 channel: saturation and hue are no-ops
    g1 = x[:, :1]
    assert torch.equal(V.adjust_saturation(g1, f), g1) and torch.equal(V.adjust_hue(g1, f), g1)


def test_solarize_matches_numpy():
    x = imgs(4)
    out = V.augment(x, V.ViewSpec(16, **{**PLAIN, "solarize_p": 1.0}), gen(0, len(x)))
    xn = x.numpy()
    assert np.array_equal(out.numpy(), np.where(xn >= 128, 255 - xn, xn))


def _np_blur(img, sigma, k):
    """float64 loops: 1-D gaussian along x then y, numpy 'reflect' padding (edge not repeated)."""
    r = k // 2
    ker = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    ker /= ker.sum()
    out = img.astype(np.float64)
    for axis in (-1, -2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(ker[j] * np.take(p, np.arange(j, j + n), axis=axis) for j in range(k))
    return out


def test_blur_matches_float64_reference():
    x = imgs(4, 3, 30, 30)
    spec = V.ViewSpec(30, **{**PLAIN, "blur_p": 1.0, "blur_sigma": (1.5, 1.5)})
    out = V.augment(x, spec, gen(0, len(x)))
    k = V.blur_kernel_size(30)
    assert k == 3 and V.blur_kernel_size(224) == 23
    assert close(out, np.round(_np_blur(x.numpy(), 1.5, k)))
    # per-sample sigma through the pure function
    sig = torch.tensor([0.5, 1.0, 2.0, 3.0])
    got = V.gaussian_blur(x.float(), sig, 7)
    for i, s in enumerate(sig.tolist()):
        np.testing.assert_allclose(got[i], _np_blur(x[i].numpy(), s, 7), atol=1e-2)


def test_randomness_is_seeded_and_views_differ():
    x = imgs(8)
    spec = V.ViewSpec(12, blur_p=0.5, solarize_p=0.3)
    a, b = V.augment(x, spec, gen(3, len(x))), V.augment(x, spec, gen(3, len(x)))
    assert torch.equal(a, b)
    out = V.make_views(x.numpy(), V.two_views(12), key=0)
    assert not torch.equal(out["view0"], out["view1"])
    again = V.make_views(x, V.two_views(12), key=0)
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(V.make_views(x, V.two_views(12), key=1)["view0"], out["view0"])


def test_strength_zero_disables_jitter():
    x = imgs(8)
    spec = V.ViewSpec(16, **{**PLAIN, "jitter_p": 1.0, "strength": 0.0})
    assert torch.equal(V.augment(x, spec, gen(0, len(x))), x)
    jittered = V.augment(x, V.ViewSpec(16, **{**PLAIN, "jitter_p": 1.0}), gen(0, len(x)))
    assert not torch.equal(jittered, x)


@pytest.mark.parametrize("field, value", [("blur_p", 1.5), ("size", 0), ("scale", (0.5, 0.2)),
                                          ("scale", (0.1, 1.2)), ("ratio", (0.0, 1.0)), ("brightness", -1),
                                          ("hue", 0.7), ("blur_sigma", (0.0, 1.0)), ("flip_p", -0.1)])
def test_spec_validation_names_field(field, value):
    kw = {"size": 8, field: value}
    with pytest.raises(ValueError, match=rf"views\.{field} must be"):
        V.ViewSpec(**kw)


def test_spec_accepts_lists_from_config():
    spec = V.ViewSpec(8, scale=[0.3, 0.9], blur_sigma=[0.5, 1.0])
    assert spec.scale == (0.3, 0.9) and hash(spec)
    with pytest.raises(ValueError, match=r"views\.ratio must be a \(lo, hi\) pair"):
        V.ViewSpec(8, ratio=(1.0,))


def test_multi_crop_columns_and_shapes():
    vs = V.multi_crop(16, 8, 6, strength=0.5)
    out = V.make_views(imgs(5, 1, 20, 20).numpy(), vs, key=1)
    cols = ["view0", "view1"] + [f"local{i}" for i in range(6)]
    assert list(out) == cols == list(vs.columns) == [c for c, _ in vs.views]
    assert all(out[c].dtype == torch.uint8 and out[c].shape == (5,) + vs.shapes(1)[c] for c in cols)
    assert vs.shapes(1)["local3"] == (1, 8, 8)
    asym = V.asymmetric_views(8, min_scale=0.3).views
    assert [c for c, _ in asym] == ["view0", "view1"] and asym[1][1].solarize_p == 0.2
    assert asym[0][1].blur_p == 1.0 and asym[0][1].scale == (0.3, 1.0)
    assert V.two_views(8, min_scale=0.5).views[1][1].scale == (0.5, 1.0)


def test_normalize_and_view_grid():
    x = imgs(4, 3, 8, 8)
    y = V.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    np.testing.assert_allclose(y, (x.numpy() / 255 - 0.5) / 0.25, atol=1e-5)
    grid = V.view_grid([x, imgs(4, 3, 4, 4)], n=3)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 3 * 10 + 2, 2 * 10 + 2)
    assert torch.equal(grid[:, 2:10, 2:10], x[0]) and torch.equal(grid[:, 12:20, 2:10], x[1])
    assert V.view_grid([imgs(2, 1, 8, 8)]).shape[0] == 3


VIEWSETS = {"two_views": V.two_views(12, blur_p=0.5), "asymmetric": V.asymmetric_views(12),
            "multi_crop": V.multi_crop(12, 6, 4)}


@pytest.mark.parametrize("name", list(VIEWSETS))
@pytest.mark.parametrize("c", [1, 3])
def test_views_depend_on_key_index_and_image_only(name, c):
    # what makes the worker's views (a batch on its device) and the pipeline's (another batching, in a task) equal
    vs, x, index = VIEWSETS[name], imgs(24, c, 20, 20), torch.arange(24) + 1000
    whole = V.make_views(x, vs, key=7, index=index)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    parts = [V.make_views(x[p], vs, key=7, index=index[p]) for p in (perm[:5], perm[5:])]
    for col in vs.columns:
        assert torch.equal(torch.cat([p[col] for p in parts]), whole[col][perm]), col
    other_epoch = V.make_views(x, vs, key=V.view_key(0, 1), index=index)
    assert not torch.equal(other_epoch["view0"], V.make_views(x, vs, key=V.view_key(0, 0), index=index)["view0"])


@pytest.mark.parametrize("name", list(VIEWSETS))
def test_blended_ops_give_the_same_views(name):
    # the device path computes every random op for every sample and keeps it where drawn; the CPU path computes
    # only the drawn samples: same pixels (to one level: float rounding of a grouped conv over another batch)
    vs, x = VIEWSETS[name], imgs(32, 3, 20, 20)
    a = V.make_views(x, vs, key=3, blend=False)
    b = V.make_views(x, vs, key=3, blend=True)
    assert all(close(a[col], b[col]) for col in vs.columns)


def test_uniforms_are_uniform_and_independent():
    u = V.uniforms(V.view_key(0, 0), torch.arange(20000), view=1)
    assert u.shape == (20000, V.DRAWS) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    counts = torch.histc(u[:, 0], 10, 0, 1)
    assert (counts - 2000).abs().max() < 200                     # ~4.5 sigma of a binomial(20000, 0.1)
    corr = torch.corrcoef(u[:, :8].T) - torch.eye(8)
    assert corr.abs().max() < 0.03                               # draws of one image are uncorrelated
    assert not torch.equal(u, V.uniforms(V.view_key(0, 0), torch.arange(20000), view=2))
    assert V.view_key(0, 1) != V.view_key(0, 0) != V.view_key(1, 0)


def test_flip_gray_and_jitter_rates_match_the_spec():
    spec = V.ViewSpec(8, flip_p=0.5, gray_p=0.2, jitter_p=0.8)
    u = V.uniforms(5, torch.arange(10000), 0)
    assert abs((u[:, V._FLIP] < spec.flip_p).float().mean() - 0.5) < 0.02
    assert abs((u[:, V._GRAYP] < spec.gray_p).float().mean() - 0.2) < 0.02
    assert abs((u[:, V._JIT] < spec.jitter_p).float().mean() - 0.8) < 0.02
    orders = u[:, V._ORDER:V._ORDER + 4].argsort(1)
    assert len({tuple(o) for o in orders.tolist()}) == 24       # every order of the 4 colour ops comes up


class _Watch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op and the devices of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        self.ops.append((func.__name__, {t.device.type for t in flat if isinstance(t, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(VIEWSETS))
def test_device_path_has_no_host_round_trip(name):
    # On the "meta" device a tensor has no data: any op that reads values back to the host (.item(), nonzero,
    # a mask's count) fails there. Every op must also keep to the batch's device (no small host tensors copied in)
    # and draw nothing from a generator: all randomness is the `uniforms` hash.
    vs = VIEWSETS[name]
    x = torch.empty(16, 3, 20, 20, dtype=torch.uint8, device="meta")
    with _Watch() as watch:
        out = V.make_views(x, vs, key=1, index=torch.arange(16, device="meta"))
    assert all(v.device.type == "meta" and v.shape[0] == 16 for v in out.values())
    names = {op for op, _ in watch.ops}
    assert all(devices <= {"meta"} for _, devices in watch.ops), [o for o in watch.ops if o[1] - {"meta"}]
    assert not names & {"nonzero", "_local_scalar_dense", "item", "_to_copy", "copy_"}, names
    assert not [n for n in names if any(r in n for r in ("uniform", "rand", "normal", "bernoulli", "random"))]
