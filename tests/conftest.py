"""Shared fixtures: tiny generated datasets, multi-process gloo runs, a local Ray instance."""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_child(rank, world, port, fn, args, queue):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # plain pickle: tensors travel as bytes, not as shared memory that dies with this process
        queue.put((rank, pickle.dumps(fn(rank, world, *args)), None))
    except Exception:  # send the child's traceback to the test
        queue.put((rank, None, traceback.format_exc()))
    finally:
        tdist.destroy_process_group()


def gloo_run(fn, world: int, *args, timeout: float = 120):
    """Run `fn(rank, world, *args)` in `world` processes joined by a gloo group; return results by rank.
    `fn` must be a module-level function (processes are spawned)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_child, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, value, err = queue.get(timeout=timeout)
            if err:
                raise AssertionError(f"rank {rank} failed:\n{err}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


@pytest.fixture
def gloo():
    return gloo_run


class FlatLinear(torch.nn.Module):
    """A BN-free encoder for distributed-equivalence tests: per-sample outputs do not depend on the batch."""

    def __init__(self, in_features, feat_dim=6):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, feat_dim)
        self.feat_dim = feat_dim

    def forward(self, x):
        return self.fc(x.flatten(1))


def make_image_folder(root, n_per_class=8, classes=("a", "b"), size=(20, 16), mode="L", seed=0):
    """Tiny class-structured images: class k has a bright blob in a class-specific place."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n_per_class):
            h, w = size[1], size[0]
            arr = rng.integers(0, 60, size=(h, w, 3 if mode == "RGB" else 1), dtype=np.uint8)
            y0 = (k * h) // len(classes)
            arr[y0:y0 + h // len(classes), :, :] += 150
            img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode=mode)
            img.save(os.path.join(root, cls, f"{i:03d}.png"))
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one torch thread is faster, and on a shared, oversubscribed box far faster than two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset of 96 train / ~some test 16x16 grey images in 2 classes, as shards + manifest."""
    from sslab.datasets import shards, sources

    root = tmp_path_factory.mktemp("tiny")
    folder = make_image_folder(str(root / "images"), n_per_class=60, size=(16, 16))
    out = str(root / "shards")
    src = sources.image_folder(folder, size=16, channels=1, test_fraction=0.2)
    shards.prepare(src.records, out, name="tiny", classes=src.classes, shard_rows=40, progress=lambda s: None)
    return out


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_ray_session):
    """A real local Ray instance (no dashboard) shared by the session's tests; started again if a test (say a
    multi-node cluster test) shut it down. Shut down when the session ends."""
    import ray

    if not ray.is_initialized():
        from sslab.platform.launch import RUNTIME_ENV

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True, runtime_env=RUNTIME_ENV)
    yield ray
