"""Fashion-MNIST written out as an image folder (train/ and test/, a sub-folder per class, one PNG per image), so
`sslab data prepare folder ... --size 32 --channels 3` can make a CIFAR-10-shaped dataset (32 px RGB) where CIFAR-10
itself cannot be downloaded: the GPU benchmarks (`benchmarks/gpu.sh`) train ResNet-18 at 32 px on it.

    .venv/bin/python benchmarks/fmnist_folder.py --data data/fashion-mnist --out data/fmnist-folder
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/fashion-mnist", help="a dataset made by `sslab data prepare`")
    ap.add_argument("--out", required=True, help="the folder to write (must not exist)")
    args = ap.parse_args()

    from PIL import Image

    from sslab.datasets.shards import load_split

    out = Path(args.out)
    if out.exists():
        ap.error(f"{out} exists: give a new folder (nothing is written into an existing one)")
    out.mkdir(parents=True)
    for split in ("train", "test"):
        images, labels, index = load_split(args.data, split)
        for label in sorted(set(labels.tolist())):
            (out / split / str(label)).mkdir(parents=True)
        for img, label, i in zip(images, labels.tolist(), index.tolist()):
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(
                out / split / str(label) / f"{i:06d}.png")
        print(f"{split}: {len(images)} images -> {out / split}")


if __name__ == "__main__":
    main()
