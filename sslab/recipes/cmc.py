"""CMC (Tian et al., "Contrastive Multiview Coding", 2019): two modalities of one image, one encoder each."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, knob
from ..datasets.views import ViewSet, ViewSpec
from .memory import MemoryBank, bank_init_knob, fill_pass, fills_bank, loss_knob, z_momentum_knob
from .protocol import Recipe, RecipeContext, StepOut
from .registry import register

SPLITS = ("auto", "lab", "intensity_gradient")
# sRGB (D65) -> CIE XYZ, and the D65 white point
_RGB2XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


@dataclass(frozen=True)
class CMCConfig:
    split: str = knob("auto", "the two modalities: lab = L vs ab of CIE Lab (the paper's, RGB only); "
                      "intensity_gradient = intensity vs its Sobel gradient magnitude; auto = lab for RGB data, "
                      "else intensity_gradient", choices=SPLITS)
    dim: int = knob(128, "feature and memory-bank row dimension", min=1)
    nce_k: int = knob(4096, "NCE noise samples per image (the authors' code; 16384 in the ImageNet runs)", min=1)
    temperature: float = knob(0.07, "softmax temperature tau", min=0.0, min_exclusive=True)
    bank_momentum: float = knob(0.5, "proximal update of both banks' rows (InstDisc's)", min=0.0, max=1.0)
    loss: str = loss_knob()
    z_momentum: float = z_momentum_knob()
    bank_init: str = bank_init_knob()


def resolve_split(split: str, channels: int) -> str:
    if split == "auto":
        return "lab" if channels == 3 else "intensity_gradient"
    if split == "lab" and channels != 3:
        raise ConfigError(f"recipe.split='lab' needs RGB images, but the data has {channels} channel(s); valid for "
                          f"this data: intensity_gradient (or auto)")
    return split


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], [n, 3, H, W] -> CIE Lab (D65): L in [0, 100], a and b in about [-110, 100]."""
    rgb = rgb.clamp(0, 1)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", _RGB2XYZ.to(rgb), lin) / _WHITE.to(rgb).view(1, 3, 1, 1)
    d = 6 / 29
    f = torch.where(xyz > d ** 3, xyz.clamp_min(d ** 3) ** (1 / 3), xyz / (3 * d * d) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def sobel_magnitude(g: torch.Tensor) -> torch.Tensor:
    """[n, 1, H, W] -> gradient magnitude [n, 1, H, W] (3x3 Sobel / 8: a unit ramp gives 1; edges replicated)."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=g.device, dtype=g.dtype) / 8
    k = torch.stack([kx, kx.T]).unsqueeze(1)                         # [2, 1, 3, 3]: d/dx, d/dy
    grad = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k)
    return torch.linalg.vector_norm(grad, dim=1, keepdim=True)


class ModalitySplit(nn.Module):
    """Normalised image [n, C, H, W] -> (modality a, modality b).

    lab: the views reach the recipe as (pixel/255 - mean) / std; this undoes it with the run's mean/std (ctx; none
    given: the views are taken as pixels in [0, 1]), converts to Lab, then L -> (L - 50) / 50 [n, 1] and
    ab -> ab / 100 [n, 2] (about [-1, 1], like the paper's code's rescaling).
    intensity_gradient: the channel mean of the normalised input [n, 1] and its Sobel gradient magnitude [n, 1]:
    the normalisation only shifts and scales them, so no un-normalising is needed.
    """

    def __init__(self, split: str, mean=(), std=()):
        super().__init__()
        self.split = split
        self.register_buffer("mean", torch.tensor(mean or (0.0,)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,)).view(1, -1, 1, 1), persistent=False)
        self.chans = (1, 2) if split == "lab" else (1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if self.split == "lab":
            lab = rgb_to_lab(x * self.std + self.mean)
            return (lab[:, :1] - 50) / 50, lab[:, 1:] / 100
        g = x.mean(1, keepdim=True)
        return g, sobel_magnitude(g)


class CMCEncoder(nn.Module):
    """What evaluation uses: both modality encoders on the split image, features concatenated (as in the paper)."""

    def __init__(self, split: ModalitySplit, enc_a: nn.Module, enc_b: nn.Module):
        super().__init__()
        self.split, self.enc_a, self.enc_b = split, enc_a, enc_b
        self.feat_dim = enc_a.feat_dim + enc_b.feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.split(x)
        return torch.cat([self.enc_a(a), self.enc_b(b)], 1)            # [n, feat_a + feat_b]


def cmc_views(rc, data, size):
    # one crop per image, the modalities are split from it; no colour jitter or grayscale: colour is a modality
    # (the paper's code: random resized crop + flip)
    spec = ViewSpec(size, (data.min_scale, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=max(data.blur_p, 0.0))
    return ViewSet((("view", spec, 1),))


# the authors' code: SGD lr 0.03 at batch 256, momentum 0.9, weight decay 1e-4
@register("cmc", config=CMCConfig, views=cmc_views,
          engine={"optimizer": "sgd", "base_lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4})
class CMC(nn.Module, Recipe):
    """CMC: an encoder per modality, each view's features contrasted with the other view's memory bank (NCE)."""

    def __init__(self, cfg: CMCConfig, ctx: RecipeContext):
        super().__init__()
        self.cfg = cfg
        split = ModalitySplit(resolve_split(cfg.split, ctx.channels), ctx.mean, ctx.std)
        self.net = CMCEncoder(split, *(ctx.make_backbone(in_chans=c) for c in split.chans))
        self.head_a = nn.Linear(self.net.enc_a.feat_dim, cfg.dim)    # linear heads + L2 norm
        self.head_b = nn.Linear(self.net.enc_b.feat_dim, cfg.dim)
        self.bank_a = MemoryBank(ctx.num_train, cfg.dim, cfg.bank_momentum, cfg.z_momentum, cfg.loss)
        self.bank_b = MemoryBank(ctx.num_train, cfg.dim, cfg.bank_momentum, cfg.z_momentum, cfg.loss)

    @staticmethod
    def check_spec(spec, manifest) -> None:
        resolve_split(spec.recipe.split, manifest.channels)

    def features(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.net.split(views[0])
        return (F.normalize(self.head_a(self.net.enc_a(a)), dim=1),     # [n, dim] each
                F.normalize(self.head_b(self.net.enc_b(b)), dim=1))

    def fills_bank(self, epoch: int) -> bool:
        return fills_bank(self.cfg.bank_init, epoch)

    @torch.no_grad()
    def fill_bank(self, views: list[torch.Tensor], batch: dict) -> None:
        fa, fb = self.features(views)
        self.bank_a.fill(fa, batch["index"])
        self.bank_b.fill(fb, batch["index"])

    def before_epoch(self, epoch: int, data) -> dict:
        return fill_pass(data, self.fill_bank) if self.fills_bank(epoch) else {}

    def forward(self, views: list[torch.Tensor], batch: dict, progress: float) -> StepOut:
        fa, fb = self.features(views)
        index = batch["index"]
        neg = self.bank_a.negatives(fa.shape[0], self.cfg.nce_k)      # one draw serves both directions
        # the two-view loss L(a, b) + L(b, a) (sec. 3.2): a's features against b's memory (positive: the image's
        # own b row), and the reverse
        loss_a = self.bank_b.loss(fa, index, neg, self.cfg.temperature)
        loss_b = self.bank_a.loss(fb, index, neg, self.cfg.temperature)
        self.bank_a.stage(fa, index)
        self.bank_b.stage(fb, index)
        return StepOut(loss_a + loss_b, {"loss_a_to_b": loss_a.detach(), "loss_b_to_a": loss_b.detach()},
                       embedding=torch.cat([fa, fb], 1).detach())

    def after_step(self, progress: float) -> None:
        self.bank_a.update()
        self.bank_b.update()

    def encoder(self) -> nn.Module:
        return self.net
