"""InstDisc and the shared memory bank: NCE and the softmax alternative against plain float64 references, the
proximal update, the negatives' stream, and 2 gloo workers equal to one process on the global batch (loss,
gradients, bank, Z)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslab import dist
from sslab.recipes.instdisc import InstDisc, InstDiscConfig
from sslab.recipes.memory import MemoryBank, nce_loss
from sslab.recipes.protocol import RecipeContext


class FlatLinear(nn.Module):
    """A BN-free encoder: per-sample outputs do not depend on the rest of the batch."""

    def __init__(self, in_features, feat_dim=8):
        super().__init__()
        self.fc = nn.Linear(in_features, feat_dim)
        self.feat_dim = feat_dim

    def forward(self, x):
        return self.fc(x.flatten(1))


def tiny_ctx(channels=1, size=4, num_train=32, mean=(), std=()):
    return RecipeContext(make_backbone=lambda in_chans=channels: FlatLinear(in_chans * size * size),
                         num_train=num_train, channels=channels, image_size=size, epochs=1, batch_size=8,
                         mean=mean, std=std)


def reference_nce(f, rows, index, neg, tau, z=None):
    """Wu et al. 2018, sec. 3.2, written out per sample in float64. Returns (loss, Z); Z is estimated from this
    batch (mean of exp(v.f/tau) over every scored row, times the bank size) when not given."""
    f, rows = f.double(), rows.double()
    n, k, size = f.shape[0], neg.shape[1], rows.shape[0]
    scores = [[math.exp(float(rows[j] @ f[i]) / tau) for j in [int(index[i])] + neg[i].tolist()] for i in range(n)]
    if z is None:
        z = sum(sum(r) for r in scores) / (n * (k + 1)) * size
    noise = k / size                                        # K * P_n
    total = 0.0
    for i in range(n):
        p = scores[i][0] / z
        total -= math.log(p / (p + noise))                  # the data sample is classified as data
        for e in scores[i][1:]:
            p = e / z
            total -= math.log(noise / (p + noise))          # each noise sample as noise
    return total / n, z


@pytest.mark.parametrize("k,tau", [(1, 0.07), (7, 0.07), (5, 0.5)])
def test_nce_loss_matches_reference(k, tau):
    g = torch.Generator().manual_seed(k)
    f = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    rows = F.normalize(torch.randn(20, 6, generator=g, dtype=torch.float64), dim=1)
    index, neg = torch.randint(20, (5,), generator=g), torch.randint(20, (5, k), generator=g)
    z = 3.7e2
    ref, _ = reference_nce(f, rows, index, neg, tau, z)
    pos, negs = (rows[index] * f).sum(1) / tau, torch.einsum("nd,nkd->nk", f, rows[neg]) / tau
    assert nce_loss(pos, negs, math.log(z), 20).item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("size", [20, 5000])   # both scoring paths: all rows, and fetched rows
def test_bank_nce_estimates_z_once(size):
    torch.manual_seed(0)
    bank = MemoryBank(size, 6, 0.5)
    g = torch.Generator().manual_seed(1)
    f1, f2 = (F.normalize(torch.randn(4, 6, generator=g), dim=1) for _ in range(2))
    index = torch.randint(size, (4,), generator=g)
    neg = bank.negatives(4, 9)
    loss1 = bank.nce(f1, index, neg, 0.07)
    ref1, z = reference_nce(f1, bank.rows, index, neg, 0.07)
    assert bool(bank.z_set) and bank.z.item() == pytest.approx(z, rel=1e-5)
    assert loss1.item() == pytest.approx(ref1, rel=1e-5)
    loss2 = bank.nce(f2, index, neg, 0.07)                  # Z stays the first batch's
    assert loss2.item() == pytest.approx(reference_nce(f2, bank.rows, index, neg, 0.07, z)[0], rel=1e-5)


def test_bank_z_moving_average():
    """z_momentum m > 0: the first batch sets Z; each later batch's estimate is folded in, Z <- m Z + (1 - m) Z_b,
    before that batch's loss is computed."""
    torch.manual_seed(0)
    bank = MemoryBank(50, 6, 0.5, z_momentum=0.9)
    g = torch.Generator().manual_seed(2)
    f1, f2 = (F.normalize(torch.randn(4, 6, generator=g), dim=1) for _ in range(2))
    index, neg = torch.randint(50, (4,), generator=g), bank.negatives(4, 9)
    bank.nce(f1, index, neg, 0.07)
    z1 = reference_nce(f1, bank.rows, index, neg, 0.07)[1]
    assert bank.z.item() == pytest.approx(z1, rel=1e-5)
    loss2 = bank.nce(f2, index, neg, 0.07)
    z = 0.9 * z1 + 0.1 * reference_nce(f2, bank.rows, index, neg, 0.07)[1]
    assert bank.z.item() == pytest.approx(z, rel=1e-5)
    assert loss2.item() == pytest.approx(reference_nce(f2, bank.rows, index, neg, 0.07, z)[0], rel=1e-5)


def reference_softmax(f, rows, index, neg, tau):
    """Cross-entropy of each sample's own row among its own and its K noise rows, per sample in float64."""
    f, rows = f.double(), rows.double()
    total = 0.0
    for i in range(f.shape[0]):
        e = [math.exp(float(rows[j] @ f[i]) / tau) for j in [int(index[i])] + neg[i].tolist()]
        total -= math.log(e[0] / sum(e))
    return total / f.shape[0]


@pytest.mark.parametrize("size", [20, 5000])
def test_bank_softmax_matches_reference_and_leaves_z_alone(size):
    torch.manual_seed(0)
    bank = MemoryBank(size, 6, 0.5)
    g = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(4, 6, generator=g), dim=1).requires_grad_()
    index, neg = torch.randint(size, (4,), generator=g), bank.negatives(4, 9)
    loss = bank.softmax(f, index, neg, 0.07)
    assert loss.item() == pytest.approx(reference_softmax(f.detach(), bank.rows, index, neg, 0.07), rel=1e-5)
    assert not bool(bank.z_set)
    loss.backward()
    assert f.grad.abs().sum() > 0


def test_recipe_softmax_loss():
    torch.manual_seed(0)
    recipe = InstDisc(InstDiscConfig(nce_k=16, loss="softmax"), tiny_ctx())
    x, index = torch.randn(4, 1, 4, 4), torch.tensor([3, 0, 31, 7])
    neg = recipe.bank.negatives(4, 16)
    out = recipe([x], {"index": index, "label": index}, 0.0)
    f = F.normalize(recipe.head(recipe.backbone(x)), dim=1).detach()
    assert out.loss.item() == pytest.approx(reference_softmax(f, recipe.bank.rows, index, neg, 0.07), rel=1e-5)


def test_bank_proximal_update_and_negatives_stream():
    torch.manual_seed(0)
    bank = MemoryBank(10, 4, 0.5)
    before = bank.rows.clone()
    first = bank.negatives(3, 5)
    assert first.shape == (3, 5) and torch.equal(first, bank.negatives(3, 5))   # a step's draw is fixed
    assert 0 <= first.min() and first.max() < 10
    f = F.normalize(torch.randn(3, 4), dim=1)
    index = torch.tensor([7, 2, 5])
    bank.stage(f, index)
    bank.update()
    for i, j in enumerate(index.tolist()):
        v = 0.5 * before[j].double() + 0.5 * f[i].double()
        assert torch.allclose(bank.rows[j].double(), v / v.norm(), atol=1e-6)
    untouched = [j for j in range(10) if j not in index.tolist()]
    assert torch.equal(bank.rows[untouched], before[untouched])
    assert int(bank.steps) == 1 and not torch.equal(bank.negatives(3, 5), first)   # the next step draws anew


def test_recipe_is_linear_head_on_unit_sphere():
    torch.manual_seed(0)
    recipe = InstDisc(InstDiscConfig(nce_k=16), tiny_ctx())
    x = torch.randn(4, 1, 4, 4)
    out = recipe([x], {"index": torch.arange(4), "label": torch.zeros(4)}, 0.0)
    f = F.normalize(recipe.head(recipe.backbone(x)), dim=1)
    assert isinstance(recipe.head, nn.Linear) and recipe.head.out_features == 128
    assert torch.allclose(out.embedding, f) and recipe.bank.rows.shape == (32, 128)
    assert torch.allclose(recipe.bank.rows.norm(dim=1), torch.ones(32))


def _steps(rank, world, xs, idxs, recipe_fn, steps=2):
    """Two training steps on this rank's slice of each global batch, with DDP's gradient averaging spelled out."""
    torch.manual_seed(0)
    recipe = recipe_fn()
    opt = torch.optim.SGD(recipe.parameters(), lr=0.5)
    out = []
    for s in range(steps):
        n = xs[s].shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        res = recipe([xs[s][sl]], {"index": idxs[s][sl], "label": idxs[s][sl]}, s / steps)
        opt.zero_grad()
        res.loss.backward()
        for p in recipe.parameters():
            dist.all_reduce(p.grad, "mean")
        grads = {k: p.grad.clone() for k, p in recipe.named_parameters()}
        opt.step()
        recipe.after_step(s / steps)
        out.append({"loss": res.loss.item(), "grads": grads,
                    "buffers": {k: v.clone() for k, v in recipe.state_dict().items() if "bank" in k}})
    return out


def _instdisc():
    return InstDisc(InstDiscConfig(nce_k=16), tiny_ctx())


def _instdisc_z():
    return InstDisc(InstDiscConfig(nce_k=16, z_momentum=0.5), tiny_ctx())


def _instdisc_softmax():
    return InstDisc(InstDiscConfig(nce_k=16, loss="softmax"), tiny_ctx())


def _instdisc_worker(rank, world, xs, idxs, factory=_instdisc):
    torch.set_num_threads(1)
    return _steps(rank, world, xs, idxs, factory)


def assert_same_as_single(multi, single):
    for s, ref in enumerate(single):
        assert sum(r[s]["loss"] for r in multi) / len(multi) == pytest.approx(ref["loss"], rel=1e-5)
        for r in multi:
            for k, g in ref["grads"].items():
                assert torch.allclose(r[s]["grads"][k], g, rtol=1e-4, atol=1e-6), f"step {s}: grad {k}"
            for k, b in ref["buffers"].items():   # banks, Z, step counters: identical replicas, equal to 1 process
                assert torch.allclose(r[s]["buffers"][k].double(), b.double(), rtol=1e-5, atol=1e-6), \
                    f"step {s}: {k}"


def global_batches(channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(8, channels, 4, 4, generator=g) for _ in range(2)]
    idxs = [torch.randperm(32, generator=g)[:8] for _ in range(2)]
    idxs[1][:3] = idxs[0][:3]     # rows seen again: the second step reads rows the first one wrote
    return xs, idxs


# NCE with Z fixed, NCE with Z re-estimated every step, and softmax cross-entropy
@pytest.mark.parametrize("factory", [_instdisc, _instdisc_z, _instdisc_softmax])
def test_two_workers_equal_one_process(gloo, factory):
    xs, idxs = global_batches()
    single = _steps(0, 1, xs, idxs, factory)
    assert bool(single[0]["buffers"]["bank.z_set"]) == (factory is not _instdisc_softmax)
    assert not torch.equal(single[0]["buffers"]["bank.rows"], single[1]["buffers"]["bank.rows"])
    z = [step["buffers"]["bank.z"].item() for step in single]
    assert (z[0] == z[1]) == (factory is not _instdisc_z)
    assert_same_as_single(gloo(_instdisc_worker, 2, xs, idxs, factory), single)


def fill_before_epoch(recipe, batches, local_batch, epoch=0):
    """The recipe's before_epoch hook given the loop's pass over `batches` [(x, index), ...] (the pass stops at the
    first batch short of `local_batch` rows on any rank)."""
    from sslab.platform.loop import whole_batches

    stream = ({"view": x, "index": index, "label": index} for x, index in batches)
    data = (([raw["view"]], raw) for raw in whole_batches(stream, local_batch, "cpu"))
    return recipe.before_epoch(epoch, data)


def _fill(rank, world, batches_per_rank, factory, local_batch):
    """The bank_init=encoder pass over this rank's batches; returns the recipe's state."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = factory()
    fill_before_epoch(recipe, batches_per_rank[rank], local_batch)
    return recipe.state_dict()


def _instdisc_filled():
    return InstDisc(InstDiscConfig(nce_k=16, bank_init="encoder"), tiny_ctx())


def _batches(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(32, generator=g)[:sum(sizes)].split(sizes)
    return [(torch.randn(len(i), 1, 4, 4, generator=g), i) for i in index]


def test_fill_pass_writes_each_row_from_the_untrained_network():
    batches = _batches([8, 8, 4], seed=1)
    torch.manual_seed(0)
    fresh = _instdisc_filled()
    assert fresh.fills_bank(0) and not fresh.fills_bank(1)          # encoder: before a fresh start's epoch 1 only
    assert not _instdisc().fills_bank(0)                           # the papers' random start stays the default
    every = InstDisc(InstDiscConfig(nce_k=16, bank_init="epoch"), tiny_ctx())
    assert every.fills_bank(0) and every.fills_bank(1) and every.fills_bank(7)
    state = _fill(0, 1, [batches], _instdisc_filled, 8)
    x, full = torch.cat([b[0] for b in batches[:2]]), torch.cat([b[1] for b in batches[:2]])
    with torch.no_grad():
        f = F.normalize(fresh.head(fresh.backbone(x)), dim=1)
    assert torch.allclose(state["bank.rows"][full], f, atol=1e-6)  # the two whole batches: rows are features
    rest = [j for j in range(32) if j not in full.tolist()]        # the short last batch and unseen rows: random
    assert torch.equal(state["bank.rows"][rest], fresh.bank.rows[rest])
    for k, v in fresh.state_dict().items():                        # no training, no step counted
        if k != "bank.rows":
            assert torch.equal(state[k], v), k


def test_fill_pass_two_workers_equal_one_process(gloo):
    """Each rank streams its own half of every global batch; both end with the bank one process gets from the
    whole batches. Rank 0 has a batch more than rank 1: both stop together (no hang), its rows stay random."""
    b = _batches([4, 4, 4, 4, 4], seed=2)
    single = _fill(0, 1, [[(torch.cat([b[0][0], b[1][0]]), torch.cat([b[0][1], b[1][1]])),
                           (torch.cat([b[2][0], b[3][0]]), torch.cat([b[2][1], b[3][1]]))]], _instdisc_filled, 8)
    multi = gloo(_fill, 2, [[b[0], b[2], b[4]], [b[1], b[3]]], _instdisc_filled, 4)
    torch.manual_seed(0)
    random_rows = _instdisc_filled().bank.rows
    assert not torch.allclose(single["bank.rows"], random_rows)
    for state in multi:
        assert torch.allclose(state["bank.rows"], single["bank.rows"], atol=1e-6)
        assert torch.equal(state["bank.rows"][b[4][1]], random_rows[b[4][1]])
