"""Export a trained backbone as a plain `state_dict` for the library model of the same name, with a JSON config
beside it saying how to rebuild that model.

    backbone.pt    torch.save(state_dict): plain tensors, loads with torch.load(..., weights_only=True)
    backbone.json  {"library": torchvision | timm | sslab, "model", "kwargs", "stem", "in_chans", "image_size",
                    "mean", "std", "feat_dim", "build": a one-line recipe, "source": the checkpoint}

- resnet18/34/50: `torchvision.models.<name>(weights=None)`; the CIFAR stem (small images) replaces `conv1` by a
  3x3 stride-1 conv and `maxpool` by Identity; any other channel count replaces the 7x7 `conv1`. `fc` is
  Identity (the export holds no classifier): set `model.fc = nn.Identity()` before a strict load, or keep your
  own `fc` and load with strict=False.
- vit_* / timm:<name>: `timm.create_model(name, **kwargs)` (kwargs recorded: num_classes=0, in_chans, img_size,
  patch_size, depth, ...).
- small_cnn: `sslab.recipes.backbones.SmallCNN(in_chans, width)`.
A recipe whose encoder holds more than the backbone (SimCLR v2's head layer, CMC's two backbones, CPC's patch
grid) exports every backbone inside it, one file pair each (backbone.pt, backbone_1.pt, ...); the config's
"encoder" field names the wrapper, which is not exported. `load_exported` rebuilds a model exactly this way.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..recipes.backbones import SmallCNN, build_backbone, cifar_stem, resnet, timm_model


def _in_chans(module: nn.Module) -> int:
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"cannot tell the input channels of {type(module).__name__}: it has no Conv2d")
    return conv.in_channels


def model_config(model_cfg, in_chans: int, image_size: int) -> dict:
    """How to rebuild `build_backbone(model_cfg, in_chans, image_size)` from its library, as plain data."""
    name = model_cfg.name
    if name == "small_cnn":
        return {"library": "sslab", "model": "small_cnn", "kwargs": {"in_chans": in_chans, "width": model_cfg.width},
                "build": "sslab.recipes.backbones.SmallCNN(**kwargs)"}
    if name.startswith("resnet"):
        stem = "cifar" if cifar_stem(model_cfg, image_size) else "imagenet"
        conv1 = ("model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity(); "
                 if stem == "cifar" else
                 "model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False); " if in_chans != 3 else "")
        return {"library": "torchvision", "model": name, "kwargs": {"weights": None}, "stem": stem,
                "build": f"model = torchvision.models.{name}(weights=None); {conv1}model.fc = nn.Identity()"}
    timm_name, kwargs = timm_model(model_cfg, in_chans, image_size)
    return {"library": "timm", "model": timm_name, "kwargs": kwargs, "build": "timm.create_model(model, **kwargs)"}


def rebuild(config: dict) -> nn.Module:
    """The library model an export's config describes, randomly initialised (load the weights into it)."""
    lib, name, kwargs, chans = config["library"], config["model"], dict(config["kwargs"]), config["in_chans"]
    if lib == "sslab" and name == "small_cnn":
        return SmallCNN(**kwargs)
    if lib == "torchvision":
        return resnet(name, chans, config["stem"] == "cifar")
    if lib == "timm":
        import timm

        return timm.create_model(name, **kwargs)
    raise ValueError(f"unknown export library {lib!r} (model {name!r})")


def load_exported(path: str, index: int = 0) -> nn.Module:
    """Rebuild and load an export (a directory, or a backbone*.json file); eval mode."""
    stem = "backbone" + (f"_{index}" if index else "")
    cfg_path = path if path.endswith(".json") else os.path.join(path, stem + ".json")
    with open(cfg_path) as f:
        config = json.load(f)
    net = rebuild(config)
    state = torch.load(os.path.join(os.path.dirname(cfg_path), config["weights"]), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def backbones_of(encoder: nn.Module, model_cfg, channels: int, image_size: int) -> list[nn.Module]:
    """The outermost sub-modules of `encoder` (itself included) of the class `build_backbone` makes."""
    kind = type(build_backbone(model_cfg, channels, image_size))
    found: list[nn.Module] = []
    inner: set[int] = set()
    for m in encoder.modules():                       # pre-order: a match's children come after it
        if id(m) in inner:
            continue
        if isinstance(m, kind):
            found.append(m)
            inner.update(id(c) for c in m.modules())
    return found


def export(checkpoint: str, out_dir: str, data_dir: str | None = None) -> list[str]:
    """Write backbone.pt + backbone.json (and _1, _2, ... for encoders holding several backbones) to `out_dir`,
    then reload each into its library model and check the weights load strictly. Returns the JSON paths."""
    from .checkpoint import load_trained

    t = load_trained(checkpoint, data_dir)
    spec = t.spec
    nets = backbones_of(t.encoder, spec.model, t.manifest.channels, t.image_size)
    if not nets:
        raise ValueError(f"{t.path}: recipe {spec.recipe_name}'s encoder ({type(t.encoder).__name__}) holds no "
                         f"{spec.model.name} backbone to export")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, net in enumerate(nets):
        stem = "backbone" + (f"_{i}" if i else "")
        chans = _in_chans(net)
        cfg = model_config(spec.model, chans, t.image_size) | {
            "in_chans": chans, "image_size": t.image_size, "feat_dim": getattr(net, "feat_dim", None),
            "mean": list(t.mean), "std": list(t.std), "weights": f"{stem}.pt",
            "input": "float [N, in_chans, image_size, image_size] = (pixel / 255 - mean) / std, per channel",
            "encoder": None if net is t.encoder else f"{type(t.encoder).__name__} (recipe {spec.recipe_name}) wraps "
                                                     f"this backbone; the wrapper is not exported",
            "source": {"checkpoint": t.path, "recipe": spec.recipe_name, "epochs": t.epoch}}
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"{stem}.pt"))
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        try:
            load_exported(out_dir, i)
        except RuntimeError as e:  # e.g. CPC swaps BatchNorm for LayerNorm: not the library's model any more
            raise ValueError(f"recipe {spec.recipe_name}'s {spec.model.name} does not load into the library model "
                             f"{cfg['model']} (it was modified by the recipe): {str(e).splitlines()[0]}") from None
        paths.append(os.path.join(out_dir, f"{stem}.json"))
    return paths
