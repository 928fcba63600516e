"""`sslab eval`: label subsets, the linear probe (checked against the optimality conditions of its objective),
fine-tuning, checkpoint discovery, the projector and the results table, on problems whose answer is known."""
import json
import os

import numpy as np
import pytest
import torch

from sslab import cli
from sslab.datasets.shards import read_manifest
from sslab.platform.checkpoint import save_state
from sslab.platform.spec import build_recipe
from sslab.evaluation.knn import extract, make_prepare
from sslab.platform.checkpoint import find_checkpoint
from sslab.platform.evaluate_runs import ray_extractor, results_table
from sslab.evaluation.probe import balanced_subset, finetune, fit_logreg, linear_probe, parse_fraction
from sslab.platform.spec import make_spec
from sslab.recipes.backbones import SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {"model.width": 4, "recipe.hidden": 16, "recipe.dim": 8, "engine.knn_k": 10}


def make_checkpoint(path, data, epoch=0, recipe="simclr", **overrides):
    small = SMALL if recipe == "simclr" else {k: v for k, v in SMALL.items() if not k.startswith("recipe.")}
    spec = make_spec(recipe, {"data.path": data, **small, **overrides})
    m = read_manifest(data)
    torch.manual_seed(epoch)
    r = build_recipe(spec, m, m.image_size[0])
    os.makedirs(path)
    save_state(path, r, torch.optim.SGD(r.parameters(), lr=0.1), epoch, 1, spec)
    return r


def clusters(n_per_class, classes=5, dim=16, noise_dims=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    signal = centres[y] + torch.randn(len(y), dim, generator=g)
    x = torch.cat([signal, 5 * torch.randn(len(y), noise_dims, generator=g)], 1)
    return x, y


def test_parse_fraction():
    assert parse_fraction("10%") == pytest.approx(0.1) and parse_fraction("1%") == pytest.approx(0.01)
    assert parse_fraction("0.5") == 0.5 and parse_fraction("100%") == 1.0
    for bad in ("0%", "150%", "ten"):
        with pytest.raises(ValueError, match="--labels"):
            parse_fraction(bad)


def test_balanced_subset_is_balanced_and_seeded():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 7 + [-1] * 5)  # -1 = unlabelled, never picked
    idx = balanced_subset(labels, 0.1, seed=3)
    assert sorted(np.bincount(labels[idx.numpy()]).tolist()) == [1, 5, 10]  # round(0.1 * n), at least 1
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, balanced_subset(labels, 0.1, seed=3))
    assert not torch.equal(idx, balanced_subset(labels, 0.1, seed=4))


def test_logreg_reaches_the_optimum_of_its_objective():
    # at the minimum of mean CE(xW + b, y) + wd/2 |W|^2 the gradient vanishes: X^T (P - Y) / n + wd W = 0 and
    # the column sums of (P - Y) are 0 (bias). Written here with numpy in float64, independently of torch.
    x, y = clusters(30, classes=3, dim=4, noise_dims=4)
    x = x.double()
    wd = 1e-2
    w, b = fit_logreg(x, y, 3, wd, max_iter=500)
    xn, wn, bn = x.numpy(), w.numpy(), b.numpy()
    logits = xn @ wn + bn
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[y.numpy()]
    grad_w = xn.T @ (p - onehot) / len(xn) + wd * wn
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-5 and np.abs(grad_b).max() < 1e-5
    assert np.abs(wn).max() > 0.1  # not the trivial zero solution


def test_linear_probe_on_separable_features():
    x, y = clusters(80)                                                     # 5 classes in 16 of 64 dims
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:300], perm[300:]
    r = linear_probe(x[train], y[train], x[test], y[test], 5, max_iter=100)
    assert r["test_top1"] >= 0.95
    assert set(r["val_top1"]) == {"0.1", "0.01", "0.001", "0.0001", "1e-05", "1e-06"}
    assert r["val_top1"][f"{r['weight_decay']:g}"] == max(r["val_top1"].values())


def stripes(n, size=16, seed=0):
    """Class 0: horizontal stripes, class 1: vertical; random phase and contrast. Flip- and crop-proof."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    t = torch.arange(size).float()
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    wave = torch.sin(t.view(1, size, 1) * 1.5 + phase)                      # varies along rows: horizontal
    wave = torch.where(y.view(-1, 1, 1) == 1, wave.transpose(1, 2), wave).expand(n, size, size)
    img = 128 + (40 + 60 * torch.rand(n, 1, 1, generator=g)) * wave + 10 * torch.randn(n, size, size, generator=g)
    return img.clamp(0, 255).round().to(torch.uint8).unsqueeze(1), y


def test_finetune_learns_a_separable_task():
    x, y = stripes(128)
    tx, ty = stripes(64, seed=1)
    torch.manual_seed(0)
    enc = SmallCNN(1, 8)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    r = finetune(enc, x, y, tx, ty, 2, make_prepare((0.5,), (0.25,), 16), image_size=16, epochs=12, batch_size=32,
                 lr=0.05)
    assert r["test_top1"] >= 0.95 and r["labelled"] == 128 and r["steps"] == 12 * 4
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items()), "the caller's encoder is untouched"


def test_find_checkpoint_picks_the_latest(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    make_checkpoint(str(run / "checkpoint_2026-01-01_10-00-00.000000"), tiny_dataset, epoch=0)
    make_checkpoint(str(run / "checkpoint_2026-01-01_10-05-00.000000"), tiny_dataset, epoch=1)
    (run / "checkpoint_2026-01-02_00-00-00.000000").mkdir()          # incomplete: no state.pt
    assert find_checkpoint(str(run)).endswith("10-05-00.000000")
    assert find_checkpoint(str(run / "checkpoint_2026-01-01_10-00-00.000000")).endswith("10-00-00.000000")
    with pytest.raises(FileNotFoundError, match="run directory"):
        find_checkpoint(str(tmp_path))


def test_eval_command_runs_every_protocol(tmp_path, tiny_dataset, capsys):
    ckpt = str(tmp_path / "run" / "checkpoint_2026-01-01_10-00-00.000000")
    make_checkpoint(ckpt, tiny_dataset)
    out = str(tmp_path / "res.json")
    rc = cli.main(["eval", str(tmp_path / "run"), "--protocol", "knn", "linear", "finetune", "--labels", "50%",
                   "--epochs", "2", "--projector", "10", "--out", out])
    assert rc == 0
    r = json.load(open(out))
    for key in ("knn_top1", "knn_top1_pixels", "linear_top1", "finetune_50%_top1"):
        assert 0.0 <= r[key] <= 1.0, key
    n_train = read_manifest(tiny_dataset).count("train")
    assert r["train_images"] == n_train and r["finetune_50%_labelled"] == n_train // 2 and r["epochs"] == 1
    # the projector sits in the run's tensorboard dir: features, one label per row, a sprite of thumbnails
    proj = os.path.join(str(tmp_path / "run"), "tensorboard")
    assert r["projector"] == proj and os.path.isfile(os.path.join(proj, "projector_config.pbtxt"))
    emb = os.path.join(proj, "00001", "sslab_eval")
    assert len(open(os.path.join(emb, "tensors.tsv")).read().splitlines()) == 10
    assert len(open(os.path.join(emb, "metadata.tsv")).read().splitlines()) == 10
    assert os.path.isfile(os.path.join(emb, "sprite.png"))
    assert cli.main(["eval", str(tmp_path)]) == 2 and "run directory" in capsys.readouterr().err  # no checkpoint


def test_results_table(tmp_path, tiny_dataset):
    runs = tmp_path / "runs"
    make_checkpoint(str(runs / "a" / "checkpoint_2026-01-01_10-00-00.000000"), tiny_dataset)
    make_checkpoint(str(runs / "b"), tiny_dataset, recipe="simsiam", **{"recipe.dim": 8, "recipe.pred_hidden": 4})
    (runs / "not-a-run").mkdir()
    md = results_table(str(runs), labels="10%", finetune_epochs=1, log=lambda s: None)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| run | recipe | backbone") and len(lines) == 2 + 2 + 1
    assert lines[2].startswith("| a | simclr | small_cnn | 1 |") and lines[3].startswith("| b | simsiam |")
    assert lines[-1].startswith("| raw pixels |")
    rows = json.load(open(runs / "results.json"))
    assert [r["run"] for r in rows] == ["a", "b"] and all("finetune_10%_top1" in r for r in rows)
    assert open(runs / "results.md").read() == md


@pytest.mark.ray
def test_feature_extraction_over_ray_tasks_matches_in_process(local_ray):
    torch.manual_seed(0)
    enc = SmallCNN(1, 4).eval()
    images = torch.randint(0, 256, (37, 1, 16, 16), dtype=torch.uint8)
    prepare = make_prepare((0.5,), (0.25,), 16)
    assert torch.allclose(ray_extractor(prepare, 3, batch=8)(enc, images), extract(enc, images, prepare), atol=1e-6)
