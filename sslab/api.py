"""sslab from Python (notebooks, scripts): the same code paths as the `sslab` command.

    import sslab
    run = sslab.train("simclr", data="~/photos", epochs=2, **{"recipe.temperature": 0.2})
    encoder = sslab.load_encoder(run.run_dir)            # an nn.Module + the preprocessing it was trained with
    feats = encoder.embed(["a.png", "b.png"])            # [2, d]
    sslab.embed(run.run_dir, data="~/photos", out="photos.parquet")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import ConfigError
from .datasets.cache import resolve_data
from .platform.checkpoint import load_trained


@dataclass
class TrainResult:
    """How a run ended: its last metrics (knn_top1, loss, ... of the last epoch), its directory, its last
    checkpoint (None when none was written) and the error that stopped it (None when it finished)."""
    metrics: dict[str, Any]
    run_dir: str
    checkpoint: str | None
    error: str | None = None
    history: list[dict] = field(default_factory=list)   # every epoch's metrics (local run directories)

    @property
    def ok(self) -> bool:
        return self.error is None


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments as dotted config keys: `epochs`, `batch_size`, `workers` are the CLI's flags;
    `engine__base_lr=0.1` and `**{"engine.base_lr": 0.1}` both set engine.base_lr."""
    flags = {"epochs": "engine.epochs", "batch_size": "engine.batch_size", "workers": "engine.workers",
             "gpu": "engine.use_gpu"}
    return {flags.get(k, k.replace("__", ".")): v for k, v in kwargs.items()}


def train(recipe: str, data: str | None = None, *, preset: str | None = None, name: str | None = None,
          storage: str | None = None, address: str | None = None, prepared_dir: str | None = None,
          verbose: bool = False, **overrides) -> TrainResult:
    """Pretrain `recipe` on `data` (a folder of images, prepared into a cache on first use, or a dataset made by
    `sslab data prepare`); returns when the run ends. Overrides as in the CLI (see `_overrides`). Errors found
    before training starts raise: `ConfigError` (settings, data that does not fit them), `FileNotFoundError` (no
    such data). A run stopped by a guard returns a result with `error` set."""
    from .platform.launch import train as launch
    from .platform.runs import read_history, resolve_storage
    from .platform.spec import make_run_spec

    flat = _overrides(overrides)
    if data is not None:
        flat["data.path"] = os.path.expanduser(data)
    result = launch(make_run_spec(recipe, flat, preset, prepared_dir), name=name, storage=storage, address=address,
                    verbose=verbose)
    # Ray gives paths inside the storage's filesystem: put a URI's scheme back, so they load again
    root = resolve_storage(storage).rstrip("/")
    run_dir = f"{root}/{os.path.basename(str(result.path))}" if "://" in root else str(result.path)
    checkpoint = f"{run_dir}/{os.path.basename(result.checkpoint.path)}" if result.checkpoint else None
    return TrainResult(dict(result.metrics or {}), run_dir, checkpoint, str(result.error) if result.error else None,
                       read_history(run_dir) if "://" not in run_dir else [])


class Encoder(nn.Module):
    """A trained encoder with the preprocessing it was trained with: `forward` takes normalised float images
    [n, C, S, S] like the backbone; `preprocess` makes them from files, PIL images or uint8 arrays; `embed` does
    both, in batches, without gradients."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], image_size: int,
                 channels: int):
        super().__init__()
        self.backbone, self.image_size, self.channels = backbone, image_size, channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def preprocess(self, images) -> torch.Tensor:
        """Files or PIL images (resized on their shorter side and centre-cropped, as `sslab data prepare` does),
        or uint8 [n, C, H, W] / [n, H, W, C] arrays or tensors -> normalised float [n, C, S, S], as `sslab eval`
        prepares them (`evaluation.knn.make_prepare`)."""
        from .evaluation.knn import make_prepare

        if isinstance(images, (list, tuple)):
            images = np.stack([self._load(im) for im in images]).transpose(0, 3, 1, 2)
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"preprocess takes files, PIL images or uint8 [n, C, H, W] images, got {x.dtype} "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.channels and x.shape[-1] == self.channels:
            x = x.permute(0, 3, 1, 2)
        return make_prepare(self.mean, self.std, self.image_size, self.mean.device)(x)

    def _load(self, image) -> np.ndarray:
        from .datasets.sources import load_image

        if isinstance(image, (str, os.PathLike)):
            return load_image(image, self.image_size, self.channels)
        import io

        buf = io.BytesIO()                                 # a PIL image: through the same decoder as files
        image.save(buf, format="PNG")
        buf.seek(0)
        return load_image(buf, self.image_size, self.channels)

    @torch.no_grad()
    def embed(self, images, batch_size: int = 256) -> torch.Tensor:
        """Features [n, d] (float, on the encoder's device) of `images` (anything `preprocess` takes)."""
        was = self.training
        self.eval()
        if not len(images):
            raise ValueError("embed: no images given")
        try:
            return torch.cat([self(self.preprocess(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)])
        finally:
            self.train(was)


def load_encoder(run_or_checkpoint: str, device: str = "cpu") -> Encoder:
    """The encoder of a run (its newest usable checkpoint) or of one checkpoint directory, in eval mode."""
    t = load_trained(os.path.expanduser(run_or_checkpoint))
    return Encoder(t.encoder, t.mean, t.std, t.image_size, t.manifest.channels).to(device).eval()


def embed(run_or_checkpoint: str, data: str | None = None, out: str = "embeddings.parquet", *,
          prepared_dir: str | None = None, **kwargs) -> str:
    """`sslab embed`: one Parquet row per image of `data` (a folder or a prepared dataset; default the run's own)
    with its id, label and embedding, computed by Ray Data. Returns the output path."""
    from .platform.embed import embed as run_embed

    if data is not None:
        data = resolve_data(os.path.expanduser(data), prepared_dir)
    return run_embed(os.path.expanduser(run_or_checkpoint), data, out, **kwargs)


__all__ = ["train", "load_encoder", "embed", "Encoder", "TrainResult", "ConfigError"]
