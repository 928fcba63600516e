"""TensorBoard's embedding projector for a set of features."""
from __future__ import annotations

import torch


def write_projector(log_dir: str, feats: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                    class_names=(), tag: str = "sslab_eval", step: int = 0) -> str:
    """`feats` [n, d] with class-name labels and uint8 `images` [n, C, H, W] as thumbnails (grey images are shown
    as RGB). Returns the directory written."""
    from torch.utils.tensorboard import SummaryWriter

    thumbs = images.float().div(255)
    if thumbs.shape[1] == 1:
        thumbs = thumbs.expand(-1, 3, -1, -1)
    names = [class_names[y] if 0 <= y < len(class_names) else str(y) for y in labels.tolist()]
    with SummaryWriter(log_dir) as w:
        w.add_embedding(feats.float(), metadata=names, label_img=thumbs, global_step=step, tag=tag)
    return log_dir
