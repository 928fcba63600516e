"""Contrastive Predictive Coding for images, CPC v2 style (van den Oord et al. 2018, "Representation Learning with
Contrastive Predictive Coding", sec. 3.2; Hénaff et al. 2020, "Data-Efficient Image Recognition with CPC", sec. 2-4).

An image is cut into an overlapping G x G grid of patches; the backbone encodes every patch on its own
(z_ij); a masked convolution gives contexts c_ij that see only rows <= i; W_k c_ij predicts z_{i+k,j}, and InfoNCE
picks the true z_{i+k,j} among patch embeddings of every position of every image of the global batch.
Choices here: one augmented view per image (the paper augments each patch; our pipeline augments whole images);
the backbone's BatchNorm becomes LayerNorm (CPC v2: batch statistics leak across patches); the kNN encoder
mean-pools the patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, knob
from ..datasets.views import ViewSet, ViewSpec
from .. import dist
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register


@dataclass(frozen=True)
class CPCConfig:
    patch: int = knob(0, "patch side in px; 0 = auto: twice the stride, grown until the grid tiles the image", min=0)
    stride: int = knob(0, "patch stride in px; 0 = half the patch (the paper's 50% overlap), or size/8 if both auto",
                       min=0)
    steps: int = knob(3, "K: predict 1..K rows ahead (v1: up to 5 rows of a 7x7 grid)", min=1)
    directions: int = knob(1, "1 = top-down only (v1); 2 adds bottom-up; 4 adds both horizontals (v2)",
                           choices=(1, 2, 4))
    context_layers: int = knob(3, "residual masked-conv blocks of the context (each sees 2 more rows up)", min=1)
    negatives: int = knob(2048, "negatives per step, sampled uniformly from all patches of the global batch; "
                                "0 = all of them", min=0)
    layer_norm: bool = knob(True, "replace the backbone's BatchNorm2d by LayerNorm (CPC v2)")


def grid_geometry(cfg: CPCConfig, size: int) -> tuple[int, int, int]:
    """(patch, stride, grid side) for `size` px images. Auto: stride size/8, patch twice that (grown until it tiles),
    a 7x7 grid at 16/32/64 px (CPC v1: 64 px patches at stride 32 on 256 px) and 6x6 at 28 px."""
    stride = cfg.stride or (cfg.patch // 2 if cfg.patch else max(1, round(size / 8)))
    patch = cfg.patch or 2 * stride
    while not cfg.patch and patch < size and (size - patch) % stride:
        patch += 1
    if patch > size or (size - patch) % stride:
        fits = [p for p in range(stride, size + 1) if (size - p) % stride == 0]
        raise ConfigError(f"recipe.patch={patch} with recipe.stride={stride} does not tile {size} px images "
                          f"(data.crop_size or the stored size): need (size - patch) % stride == 0, e.g. patch in "
                          f"{fits[:6]} for this stride, or recipe.patch=0 for an automatic fit")
    grid = (size - patch) // stride + 1
    if grid <= cfg.steps:
        raise ConfigError(f"recipe.steps={cfg.steps} needs a grid of more than {cfg.steps} rows; {size} px images "
                          f"with patch {patch} / stride {stride} give {grid}x{grid}")
    return patch, stride, grid


def grid_infonce(pred: torch.Tensor, z_all: torch.Tensor, rows: torch.Tensor, neg_idx: torch.Tensor | None):
    """InfoNCE over a prediction grid -> (mean loss, accuracy).

    pred [B, K, F, G, G]: pred[:, k-1, :, i, j] predicts the embedding of patch (i+k, j); z_all [M, F]: every patch
    embedding of the global batch; rows [B, G, G] long: the row of z_all holding each of this worker's patches;
    neg_idx [N] rows of z_all used as negatives (None = all M). The target's own row is masked out of them.
    """
    b, k_max, f, g, _ = pred.shape
    q = torch.cat([pred[:, k - 1, :, :g - k].permute(0, 2, 3, 1).reshape(-1, f) for k in range(1, k_max + 1)])
    pos = torch.cat([rows[:, k:].reshape(-1) for k in range(1, k_max + 1)])      # [Q] target rows
    dt = torch.promote_types(q.dtype, torch.float32)                             # logits at least fp32 (AMP)
    q, z_all = q.to(dt), z_all.to(dt)
    cand = torch.arange(len(z_all), device=q.device) if neg_idx is None else neg_idx
    l_pos = (q * z_all[pos]).sum(1, keepdim=True)                                # [Q, 1]
    l_neg = (q @ z_all[cand].T).masked_fill(cand[None] == pos[:, None], float("-inf"))  # [Q, N]
    logits = torch.cat([l_pos, l_neg], 1)
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    acc = (logits.argmax(1) == 0).float().mean()
    return F.cross_entropy(logits, target), acc.detach()


class PatchEncoder(nn.Module):
    """The backbone on every patch: images [B, C, S, S] -> grid [B, F, G, G]; forward mean-pools it -> [B, F]."""

    def __init__(self, backbone: nn.Module, patch: int, stride: int):
        super().__init__()
        self.backbone, self.patch, self.stride = backbone, patch, stride
        self.feat_dim = backbone.feat_dim

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        p = x.unfold(2, self.patch, self.stride).unfold(3, self.patch, self.stride)  # [B, C, G, G, p, p]
        gh, gw = p.shape[2:4]
        z = self.backbone(p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, self.patch, self.patch))  # [B*G*G, F]
        return z.view(b, gh, gw, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x).mean(dim=(2, 3))


class MaskedContext(nn.Module):
    """PixelCNN-style context: c[:, :, i, j] depends on z[:, :, u, v] for u <= i only. Each residual block is a
    ResNet-style bottleneck (1x1 down to dim/4, keeping it cheap beside the patch encoder) around a 3x3 convolution
    padded with two rows above and none below, so information never flows upwards."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        h = max(8, dim // 4)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Conv2d(dim, h, 1), nn.Conv2d(h, h, 3), nn.Conv2d(h, dim, 1)])
                                    for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z
        for down, masked, up in self.blocks:
            y = F.pad(F.relu(down(F.relu(c))), (1, 1, 2, 0))                # pad (left, right, top, bottom)
            c = c + up(F.relu(masked(y)))
        return c


def layer_norm_(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for a LayerNorm over (C, H, W) of each sample (GroupNorm with one group)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps))
        else:
            layer_norm_(child)
    return module


def cpc_views(rc, data, size):
    # one view per image; CPC v2 augments patches separately, here the whole image goes through the pipeline once
    blur = data.blur_p if data.blur_p >= 0 else 0.0
    return ViewSet((("view", ViewSpec(size, (data.min_scale, 1.0), strength=data.strength, blur_p=blur), 1),))


@register("cpc", config=CPCConfig, views=cpc_views,
          engine={"optimizer": "adamw", "base_lr": 1e-3, "weight_decay": 1e-5})
class CPC(nn.Module, Recipe):
    """CPC v2 (images): patch grid, masked-conv context, InfoNCE over k-rows-ahead predictions, global negatives."""

    def __init__(self, cfg: CPCConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        patch, stride, _ = grid_geometry(cfg, ctx.image_size)
        backbone = ctx.make_backbone()
        self.patches = PatchEncoder(layer_norm_(backbone) if cfg.layer_norm else backbone, patch, stride)
        dim = backbone.feat_dim
        self.context = nn.ModuleList(MaskedContext(dim, cfg.context_layers) for _ in range(cfg.directions))
        self.predict = nn.ModuleList(nn.Conv2d(dim, cfg.steps * dim, 1, bias=False)  # W_1..W_K stacked
                                     for _ in range(cfg.directions))

    @staticmethod
    def check_spec(spec, manifest) -> None:
        grid_geometry(spec.recipe, spec.data.crop_size or manifest.image_size[0])
        name = spec.model.name
        if name.startswith("vit") or (name.startswith("timm:") and ("vit" in name or "deit" in name)):
            raise ConfigError(f"model.name={name}: cpc encodes small patches one by one, and a ViT is built for "
                              f"whole images of a fixed size; use small_cnn or a resnet")

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        z = self.patches.grid(views[0])                                       # [B, F, G, G]
        b, f, g, _ = z.shape
        z_all = dist.gather_with_grad(z.permute(0, 2, 3, 1).reshape(-1, f))  # [W*B*G*G, F], rank-major
        rows = (dist.rank() * b * g * g + torch.arange(b * g * g, device=z.device)).view(b, g, g)
        n = self.cfg.negatives
        neg_idx = torch.randperm(len(z_all), device=z.device)[:n] if 0 < n < len(z_all) else None
        losses, accs = [], []
        for d, (context, predict) in enumerate(zip(self.context, self.predict)):
            r = (0, 2, 1, 3)[d]                                               # rotate: "rows below" -> other sides
            zr, rows_r = torch.rot90(z, r, (2, 3)), torch.rot90(rows, r, (1, 2))
            pred = predict(context(zr)).view(b, self.cfg.steps, f, g, g)      # [B, K, F, G, G]
            loss, acc = grid_infonce(pred, z_all, rows_r, neg_idx)
            losses.append(loss)
            accs.append(acc)
        emb = F.normalize(z.detach().mean(dim=(2, 3)), dim=1)
        return StepOut(torch.stack(losses).mean(), {"cpc_acc": torch.stack(accs).mean()}, emb)

    def encoder(self) -> nn.Module:
        return self.patches
