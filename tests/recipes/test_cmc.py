"""CMC: the modality splits (Lab on known colours, Sobel against a loop), the impossible split as a ConfigError
before Ray, the two-direction NCE loss and bank updates against a float64 reference, and 2 gloo workers equal to
one process on the global batch."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sslab.config import ConfigError
from sslab.recipes.cmc import CMC, CMCConfig, ModalitySplit, rgb_to_lab
from tests.recipes.test_instdisc import (_steps, assert_same_as_single, global_batches, reference_nce,
                                         reference_softmax, tiny_ctx)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_rgb_to_lab_on_known_colours():
    # CIE Lab (D65) of the sRGB primaries and extremes, from the standard formulas
    known = {(1, 1, 1): (100, 0, 0), (0, 0, 0): (0, 0, 0), (1, 0, 0): (53.2408, 80.0925, 67.2032),
             (0, 1, 0): (87.7347, -86.1827, 83.1793), (0, 0, 1): (32.2970, 79.1875, -107.8602),
             (1, 1, 0): (97.1393, -21.5537, 94.4780)}
    rgb = torch.tensor(list(known), dtype=torch.float64).view(-1, 3, 1, 1)
    lab = rgb_to_lab(rgb).view(-1, 3)
    assert torch.allclose(lab, torch.tensor(list(known.values()), dtype=torch.float64), atol=0.02)


def test_lab_split_undoes_the_normalisation():
    raw = torch.rand(2, 3, 5, 5)
    x = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    lum, ab = ModalitySplit("lab", MEAN, STD)(x)
    lab = rgb_to_lab(raw.double())
    assert lum.shape == (2, 1, 5, 5) and ab.shape == (2, 2, 5, 5)
    assert torch.allclose(lum.double(), (lab[:, :1] - 50) / 50, atol=1e-4)
    assert torch.allclose(ab.double(), lab[:, 1:] / 100, atol=1e-4)


def test_intensity_gradient_split_against_a_loop():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    inten, grad = ModalitySplit("intensity_gradient")(x)
    g = x.mean(1)[0]
    h, w = g.shape
    px = lambda i, j: float(g[min(max(i, 0), h - 1), min(max(j, 0), w - 1)])   # edges replicated
    for i in range(h):
        for j in range(w):
            gx = sum(wt * (px(i + di, j + 1) - px(i + di, j - 1)) for di, wt in ((-1, 1), (0, 2), (1, 1))) / 8
            gy = sum(wt * (px(i + 1, j + dj) - px(i - 1, j + dj)) for dj, wt in ((-1, 1), (0, 2), (1, 1))) / 8
            assert float(grad[0, 0, i, j]) == pytest.approx(math.hypot(gx, gy), abs=1e-5)
    assert torch.allclose(inten[0, 0].double(), g)


def test_impossible_split_is_a_config_error_before_ray(tiny_dataset):
    from sslab.platform.launch import validate
    from sslab.platform.spec import make_spec

    with pytest.raises(ConfigError, match="recipe.split='lab' needs RGB"):
        CMC.check_spec(SimpleNamespace(recipe=CMCConfig(split="lab")), SimpleNamespace(channels=1))
    spec = lambda split: make_spec("cmc", {"data.path": tiny_dataset, "engine.batch_size": 16, "recipe.split": split})
    with pytest.raises(ConfigError, match="recipe.split"):
        validate(spec("lab"), 1)                                    # tiny_dataset is 1-channel
    with pytest.raises(ConfigError, match="recipe.split"):
        CMC(CMCConfig(split="lab"), tiny_ctx(channels=1))
    validate(spec("auto"), 1)
    CMC.check_spec(SimpleNamespace(recipe=CMCConfig(split="lab")), SimpleNamespace(channels=3))


@pytest.mark.parametrize("z_momentum", [0.0, 0.5])
def test_loss_both_directions_and_bank_updates_match_reference(z_momentum):
    torch.manual_seed(0)
    recipe = CMC(CMCConfig(nce_k=6, split="lab", z_momentum=z_momentum), tiny_ctx(channels=3, mean=MEAN, std=STD))
    x = torch.randn(4, 3, 4, 4)
    index = torch.tensor([3, 9, 0, 30])
    rows_a, rows_b = recipe.bank_a.rows.clone(), recipe.bank_b.rows.clone()
    neg = recipe.bank_a.negatives(4, 6)
    out = recipe([x], {"index": index, "label": index}, 0.0)
    with torch.no_grad():
        a, b = ModalitySplit("lab", MEAN, STD)(x)
        assert a.shape[1] == 1 and b.shape[1] == 2
        fa = F.normalize(recipe.head_a(recipe.net.enc_a(a)), dim=1)
        fb = F.normalize(recipe.head_b(recipe.net.enc_b(b)), dim=1)
    # L's features against ab's memory and ab's against L's, each with its own Z from this first batch
    loss_a, z_b = reference_nce(fa, rows_b, index, neg, 0.07)
    loss_b, z_a = reference_nce(fb, rows_a, index, neg, 0.07)
    assert out.loss.item() == pytest.approx(loss_a + loss_b, rel=1e-5)
    assert recipe.bank_b.z.item() == pytest.approx(z_b, rel=1e-5)
    assert recipe.bank_a.z.item() == pytest.approx(z_a, rel=1e-5)
    recipe.after_step(0.0)
    for rows, new, f in ((rows_a, recipe.bank_a.rows, fa), (rows_b, recipe.bank_b.rows, fb)):
        v = 0.5 * rows[index].double() + 0.5 * f.double()
        assert torch.allclose(new[index].double(), F.normalize(v, dim=1), atol=1e-6)
    # a second step: each bank's Z stays the first batch's, or moves toward this batch's estimate
    neg2 = recipe.bank_a.negatives(4, 6)
    out2 = recipe([x], {"index": index, "label": index}, 0.5)
    za2 = (1 - z_momentum) * reference_nce(fb, recipe.bank_a.rows, index, neg2, 0.07)[1] + z_momentum * z_a
    zb2 = (1 - z_momentum) * reference_nce(fa, recipe.bank_b.rows, index, neg2, 0.07)[1] + z_momentum * z_b
    if z_momentum == 0:
        za2, zb2 = z_a, z_b
    assert recipe.bank_a.z.item() == pytest.approx(za2, rel=1e-5)
    assert recipe.bank_b.z.item() == pytest.approx(zb2, rel=1e-5)
    assert out2.loss.item() == pytest.approx(reference_nce(fa, recipe.bank_b.rows, index, neg2, 0.07, zb2)[0] +
                                             reference_nce(fb, recipe.bank_a.rows, index, neg2, 0.07, za2)[0],
                                             rel=1e-5)
    # evaluation: both encoders on the split image, concatenated
    assert torch.allclose(recipe.encoder()(x), torch.cat([recipe.net.enc_a(a), recipe.net.enc_b(b)], 1))
    assert recipe.encoder().feat_dim == 16


def test_softmax_loss_both_directions():
    torch.manual_seed(0)
    recipe = CMC(CMCConfig(nce_k=6, split="lab", loss="softmax"), tiny_ctx(channels=3, mean=MEAN, std=STD))
    x, index = torch.randn(4, 3, 4, 4), torch.tensor([3, 9, 0, 30])
    neg = recipe.bank_a.negatives(4, 6)
    out = recipe([x], {"index": index, "label": index}, 0.0)
    with torch.no_grad():
        a, b = ModalitySplit("lab", MEAN, STD)(x)
        fa = F.normalize(recipe.head_a(recipe.net.enc_a(a)), dim=1)
        fb = F.normalize(recipe.head_b(recipe.net.enc_b(b)), dim=1)
    ref = (reference_softmax(fa, recipe.bank_b.rows, index, neg, 0.07) +
           reference_softmax(fb, recipe.bank_a.rows, index, neg, 0.07))
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


def _cmc():
    return CMC(CMCConfig(nce_k=16), tiny_ctx(channels=3, mean=MEAN, std=STD))


def _cmc_worker(rank, world, xs, idxs):
    torch.set_num_threads(1)
    return _steps(rank, world, xs, idxs, _cmc)


def test_two_workers_equal_one_process(gloo):
    xs, idxs = global_batches(channels=3)
    single = _steps(0, 1, xs, idxs, _cmc)
    assert {"bank_a.rows", "bank_b.rows", "bank_a.z", "bank_b.z"} <= set(single[0]["buffers"])
    assert_same_as_single(gloo(_cmc_worker, 2, xs, idxs), single)


def test_fill_pass_writes_both_banks_from_their_own_modality():
    from tests.recipes.test_instdisc import fill_before_epoch

    torch.manual_seed(0)
    recipe = CMC(CMCConfig(nce_k=6, split="lab", bank_init="encoder"), tiny_ctx(channels=3, mean=MEAN, std=STD))
    x, index = torch.randn(8, 3, 4, 4), torch.randperm(32)[:8]
    with torch.no_grad():
        a, b = ModalitySplit("lab", MEAN, STD)(x)
        fa = F.normalize(recipe.head_a(recipe.net.enc_a(a)), dim=1)
        fb = F.normalize(recipe.head_b(recipe.net.enc_b(b)), dim=1)
    fill_before_epoch(recipe, [(x, index)], 8)
    assert torch.allclose(recipe.bank_a.rows[index], fa, atol=1e-6)
    assert torch.allclose(recipe.bank_b.rows[index], fb, atol=1e-6)
