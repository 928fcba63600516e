#!/usr/bin/env bash
# The GPU checks of the data-path work, as one prepared script for a lent GPU machine (fresh: it installs), sized
# to finish in under ~8 minutes on an H100/H200 with 16 CPUs. JSON results go to $OUT (default bench/gpu):
#   train_simclr.json  `sslab bench train --gpu`: ResNet-18 (CIFAR stem) SimCLR at 32 px, bf16, channels-last,
#                      global batch 512, views made on the GPU: the engine against the bare loop on the same GPU
#                      over preloaded uint8 images with the same on-device views (goal >= 0.9x, >= 12k img/s)
#   train_dino.json    the same for DINO with multi-crop (2 x 32 px + 6 x 16 px views)
#   data.json          `sslab bench data --cpus 15`: the Ray Data stream against DataLoaders on 15 CPUs
#   views.json         sslab's view ops against kornia.augmentation on the GPU and the CPU
# Run from the repository root:  bash benchmarks/gpu.sh
set -euo pipefail
OUT=${OUT:-bench/gpu}
mkdir -p "$OUT"
start=$(date +%s)
make setup >/dev/null
# ResNet-18 trains at 32 px RGB, CIFAR-10's shape; CIFAR-10 cannot be downloaded here, so Fashion-MNIST is resized
# to it (sslab refuses data.crop_size larger than the stored images): ~40 s on 2 cores
if [ ! -f data/fmnist32/manifest.json ]; then
    folder=$(mktemp -d)/fmnist
    .venv/bin/python benchmarks/fmnist_folder.py --data data/fashion-mnist --out "$folder" >/dev/null
    .venv/bin/sslab data prepare folder "$folder" --out data/fmnist32 --size 32 --channels 3 >/dev/null
    rm -r "$(dirname "$folder")"
fi
.venv/bin/pip install -q kornia >/dev/null 2>&1 || echo "kornia not installed: views.json will lack it"
echo "setup: $(( $(date +%s) - start )) s"
common=(--gpu --data data/fmnist32 --batch-size 512 --epochs 3 --steps 100 --warmup 10
        --cpus-per-worker 8 model.name=resnet18)
timeout 200 .venv/bin/sslab bench train "${common[@]}" --out "$OUT/train_simclr.json" | tail -9 || true
timeout 200 .venv/bin/sslab bench train "${common[@]}" --recipe dino --out "$OUT/train_dino.json" \
    recipe.local_size=16 recipe.n_local=6 | tail -9 || true
timeout 150 .venv/bin/sslab bench data --cpus 15 --repeats 1 --out "$OUT/data.json" | tail -6 || true
timeout 60 .venv/bin/python benchmarks/views_kornia.py --out "$OUT/views.json" || true
echo "total: $(( $(date +%s) - start )) s"
