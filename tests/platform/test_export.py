"""Export round trips: the exported state_dict loads strictly into the library model of the same name, built here
by hand from the JSON config, and gives the same features as the trained encoder."""
import json
import os

import pytest
import torch
from torch import nn

from sslab import cli
from sslab.datasets.shards import read_manifest
from sslab.platform.checkpoint import save_state
from sslab.platform.spec import build_recipe
from sslab.platform.export import export, load_exported
from sslab.platform.spec import make_spec


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(path, data, recipe="simclr", **overrides):
    """A checkpoint whose BatchNorm statistics are not the defaults, so the export must carry the buffers."""
    spec = make_spec(recipe, {"data.path": data, **overrides})
    m = read_manifest(data)
    torch.manual_seed(0)
    r = build_recipe(spec, m, m.image_size[0])
    with torch.no_grad():
        for mod in r.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    os.makedirs(path)
    save_state(path, r, torch.optim.SGD(r.parameters(), lr=0.1), 0, 1, spec)
    return r.eval()


def by_hand(cfg: dict) -> nn.Module:
    """The named library model, built from the config's fields without sslab's help."""
    if cfg["library"] == "torchvision":
        import torchvision

        net = getattr(torchvision.models, cfg["model"])(**cfg["kwargs"])
        if cfg["stem"] == "cifar":
            net.conv1 = nn.Conv2d(cfg["in_chans"], 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif cfg["in_chans"] != 3:
            net.conv1 = nn.Conv2d(cfg["in_chans"], 64, 7, 2, 3, bias=False)
        net.fc = nn.Identity()
        return net
    if cfg["library"] == "timm":
        import timm

        return timm.create_model(cfg["model"], **cfg["kwargs"])
    from sslab.recipes.backbones import SmallCNN

    assert cfg["model"] == "small_cnn"
    return SmallCNN(**cfg["kwargs"])


CASES = {
    "small_cnn": ({"model.width": 4}, "sslab", None),
    "resnet18-cifar": ({"model.name": "resnet18"}, "torchvision", "cifar"),          # 16 px: auto = cifar stem
    "resnet18-imagenet": ({"model.name": "resnet18", "model.stem": "imagenet"}, "torchvision", "imagenet"),
    "vit_tiny": ({"model.name": "vit_tiny", "model.depth": 1, "model.patch_size": 4}, "timm", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trips_into_the_named_model(case, tmp_path, tiny_dataset):
    overrides, library, stem = CASES[case]
    recipe = trained(str(tmp_path / "ckpt"), tiny_dataset, **overrides, **{"recipe.hidden": 8, "recipe.dim": 8})
    out = str(tmp_path / "export")
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--export", out]) == 0
    cfg = json.load(open(os.path.join(out, "backbone.json")))
    assert cfg["library"] == library and cfg["in_chans"] == 1 and cfg["image_size"] == 16
    assert cfg.get("stem") == stem and cfg["encoder"] is None and cfg["mean"] == list(read_manifest(tiny_dataset).mean)
    net = by_hand(cfg)
    net.load_state_dict(torch.load(os.path.join(out, cfg["weights"]), weights_only=True))  # strict
    net.eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        want = recipe.encoder()(x)
        assert torch.allclose(net(x), want, atol=1e-5) and torch.allclose(load_exported(out)(x), want, atol=1e-5)


def test_export_finds_the_backbone_inside_a_wrapper(tmp_path, tiny_dataset):
    # SimCLR v2 evaluates from the head's first layer: encoder() = Sequential(backbone, Linear, BN, ReLU)
    recipe = trained(str(tmp_path / "ckpt"), tiny_dataset, "simclrv2", **{"model.width": 4, "recipe.hidden": 8,
                                                                         "recipe.dim": 8})
    paths = export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    cfg = json.load(open(paths[0]))
    assert len(paths) == 1 and "Sequential" in cfg["encoder"]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(load_exported(str(tmp_path / "out"))(x), recipe.backbone(x), atol=1e-6)


def test_export_refuses_a_backbone_the_recipe_rebuilt(tmp_path, tiny_dataset):
    # CPC v2 swaps BatchNorm for LayerNorm: its weights are no longer those of the library's model
    trained(str(tmp_path / "ckpt"), tiny_dataset, "cpc", **{"model.width": 4})
    with pytest.raises(ValueError, match="does not load into the library model"):
        export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
