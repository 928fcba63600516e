"""Backbones: a small CNN for CPU runs, torchvision ResNets (CIFAR stem option), timm models (ViTs sized for
small images). All built with random weights (`pretrained=False`); each exposes `.feat_dim`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import knob

BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small")


@dataclass(frozen=True)
class ModelConfig:
    name: str = knob("small_cnn", "backbone: one of the built-ins or timm:<model name>")
    width: int = knob(32, "small_cnn: channels of the first layer (doubles per layer)", min=4)
    stem: str = knob("auto", "ResNet stem: cifar (3x3, no max-pool), imagenet, or auto (cifar below 64 px)",
                     choices=("auto", "cifar", "imagenet"))
    patch_size: int = knob(4, "ViT patch size in pixels", min=1)
    depth: int = knob(0, "ViT depth (0 = the model's default)", min=0)
    freeze_patch_embed: bool = knob(False, "ViT: keep the random patch projection frozen (MoCo v3's stability trick)")
    drop_path: float = knob(0.0, "ViT stochastic depth rate", min=0.0, max=1.0)

    def check(self):
        if self.name not in BACKBONES and not self.name.startswith("timm:"):
            raise ValueError(f"name must be one of {list(BACKBONES)} or timm:<model>, got {self.name!r}")


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (width w, 2w, 4w, 8w; the last three stride 2) and global average pooling."""

    def __init__(self, in_chans: int, width: int = 32):
        super().__init__()
        chans = [in_chans, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.feat_dim = chans[-1]

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))  # [N, 8w]


def cifar_stem(cfg: ModelConfig, image_size: int) -> bool:
    """Whether a ResNet gets the small-image stem (3x3 stride-1 conv, no max-pool) for this config and size."""
    return cfg.stem == "cifar" or (cfg.stem == "auto" and image_size < 64)


def resnet(name: str, in_chans: int, cifar: bool) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if cifar:  # small images: 3x3 stride-1 first conv, no max-pool (SimCLR's CIFAR variant)
        net.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    net.feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def timm_model(cfg: ModelConfig, in_chans: int, image_size: int) -> tuple[str, dict]:
    """The timm model name and `timm.create_model` keyword arguments for `cfg` (what an export records)."""
    name = f"{cfg.name}_patch16_224" if cfg.name in ("vit_tiny", "vit_small") else cfg.name.removeprefix("timm:")
    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_chans)
    if "vit" in name or "deit" in name:
        # sized for the data; any other input size works too (multi-crop feeds two): timm interpolates the
        # position embedding and pads the input to whole patches
        kwargs.update(img_size=image_size, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path,
                      dynamic_img_size=True, dynamic_img_pad=True)
        if cfg.depth:
            kwargs["depth"] = cfg.depth
    return name, kwargs


def _timm(cfg: ModelConfig, in_chans: int, image_size: int) -> nn.Module:
    import timm

    name, kwargs = timm_model(cfg, in_chans, image_size)
    net = timm.create_model(name, **kwargs)
    net.feat_dim = net.num_features
    if cfg.freeze_patch_embed and hasattr(net, "patch_embed"):
        for p in net.patch_embed.parameters():
            p.requires_grad_(False)
    return net


def build_backbone(cfg: ModelConfig, in_chans: int, image_size: int) -> nn.Module:
    """A randomly initialised backbone mapping [N, in_chans, S, S] images to [N, feat_dim] features."""
    if cfg.name == "small_cnn":
        return SmallCNN(in_chans, cfg.width)
    if cfg.name.startswith("resnet"):
        return resnet(cfg.name, in_chans, cifar_stem(cfg, image_size))
    return _timm(cfg, in_chans, image_size)



def local_layer(backbone: nn.Module) -> nn.Module:
    """The layer whose output is the backbone's local feature map (Deep InfoMax's M): the small CNN's third block,
    a ResNet's layer3, a ViT's last block (its patch tokens)."""
    if isinstance(backbone, SmallCNN):
        return backbone.body[8]                  # after the third conv-BN-ReLU: [n, 4w, S/4, S/4]
    if hasattr(backbone, "layer3"):
        return backbone.layer3                   # torchvision ResNet: [n, 256 (1024 for resnet50), S/8 or S/4, ...]
    if hasattr(backbone, "blocks") and hasattr(backbone, "num_prefix_tokens"):
        return backbone.blocks[-1]               # timm ViT: [n, prefix + h*w, C]
    raise ValueError(f"no local feature map known for {type(backbone).__name__}: use small_cnn, a resnet or a ViT")


def forward_with_local(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the backbone's features [n, feat_dim] and its local feature map [n, C, h, w] (ViT patch
    tokens laid out on their grid). The hook lives only for this call, so the backbone stays a plain module."""
    seen = []
    handle = local_layer(backbone).register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        feats = backbone(x)
    finally:
        handle.remove()
    local = seen[-1]
    if local.dim() == 3:                         # tokens: drop the class/register tokens, lay patches on the grid
        tokens = local[:, backbone.num_prefix_tokens:]
        side = math.isqrt(tokens.shape[1])
        local = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    return feats, local
