"""cluster.yaml against the cluster launcher's own schema, the files it installs from, its security defaults;
URI storage for TensorBoard; a real multi-node Ray cluster on this machine with one Train worker per node."""
import copy
import json
import logging
import math
import os
import re

import pytest
import torch
import yaml

from sslab.platform.checkpoint import STATE_FILE
from sslab.platform.callbacks import TensorBoard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_YAML = os.path.join(ROOT, "cluster.yaml")
REMOTE = "~/sslab"  # where cluster.yaml puts the repo on every node


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def launcher_validate(cfg: dict) -> None:
    """What `ray up` checks before it touches a cloud: the raw file against ray-schema.json, then the config
    merged with the provider's defaults (prepare_config) against it again."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(cfg, json.load(f))
    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)  # its file-mount advice is about Docker
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_passes_the_launchers_schema(cluster_cfg):
    launcher_validate(cluster_cfg)
    nodes = cluster_cfg["available_node_types"]
    head = nodes[cluster_cfg["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != cluster_cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"] and workers, "a head node type and a worker node type"
    assert any(w["node_config"]["InstanceType"][0] in "gp" for w in workers), "an AWS GPU family (g*, p*)"
    for w in workers:
        assert 0 <= w["min_workers"] <= w["max_workers"] <= cluster_cfg["max_workers"]


def _fractional_gpu(c):
    c["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}


def _unknown_key(c):
    c["dashboard_host"] = "0.0.0.0"


def _no_provider(c):
    del c["provider"]


def _no_node_config(c):
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _bad_head_type(c):
    c["head_node_type"] = "gpu-head"


@pytest.mark.parametrize("breaks", [_fractional_gpu, _unknown_key, _no_provider, _no_node_config, _bad_head_type])
def test_a_broken_copy_fails_validation(cluster_cfg, breaks):
    import jsonschema

    broken = copy.deepcopy(cluster_cfg)
    breaks(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_validate(broken)


def _make_targets(makefile: str) -> tuple[set[str], dict[str, str]]:
    """Rule targets of a Makefile with $(VAR)s expanded, and its variables."""
    variables, targets = {}, set()
    text = open(makefile).read()
    for name, value in re.findall(r"^([A-Za-z_]+)\s*[:?]?=\s*(.*)$", text, re.M):
        variables[name] = value.strip()

    def expand(s):
        for _ in range(5):
            s = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), s)
        return s

    for line in re.findall(r"^([^\s#:=][^:=]*):(?!=)", text, re.M):
        targets.update(expand(t) for t in line.split())
    return targets, {k: expand(v) for k, v in variables.items()}


def test_setup_uses_only_files_that_exist(cluster_cfg):
    mounts = dict(cluster_cfg["file_mounts"])
    # Ray's token: the same file on every node as on the machine that runs `ray up` (not a repo file)
    assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = cluster_cfg["head_start_ray_commands"] + cluster_cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    for remote, local in mounts.items():
        assert remote.startswith(REMOTE + "/"), remote
        assert os.path.exists(os.path.join(ROOT, local)), f"file_mounts: {local} is not in the repo"
        assert remote[len(REMOTE) + 1:] == os.path.normpath(local), "mounted at the same place under ~/sslab"
    mounted = {r[len(REMOTE) + 1:] for r in mounts}
    # pip install -e needs what pyproject.toml points at
    assert {"pyproject.toml", "Makefile", "sslab"} <= mounted
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        readme = re.search(r'^readme\s*=\s*"([^"]+)"', f.read(), re.M)
    assert readme is None or readme.group(1) in mounted

    targets, variables = _make_targets(os.path.join(ROOT, "Makefile"))
    made = {variables["VENV"]} | targets  # the virtualenv and every file a rule makes
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in cluster_cfg.get(key) or []]
    make_calls = [t for c in commands for t in re.findall(r"make -C ~/sslab ([^\s;&|]+)", c)]
    assert make_calls, "setup goes through the Makefile"
    for target in make_calls:
        assert target in targets, f"`make {target}`: no such rule in the Makefile"
    for c in commands:
        for path in re.findall(r"(?:~|\$HOME)/sslab/([\w./-]+)", c):
            first = path.split("/")[0]
            assert first in mounted or first in made or path in made, f"{path!r} in {c!r} comes from nowhere"


def test_security_defaults(cluster_cfg):
    text = open(CLUSTER_YAML).read()
    assert "0.0.0.0" not in text, "nothing binds to every interface"
    head_start = " ".join(cluster_cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # Ray's launcher default is 0.0.0.0
    for node in cluster_cfg["available_node_types"].values():  # no extra security groups or open ports
        assert not {"SecurityGroupIds", "NetworkInterfaces"} & set(node["node_config"])
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|PRIVATE KEY|ssh_private_key:", text)
    assert "s3://YOUR-BUCKET/" in text and "YOUR-ACCOUNT-ID" in text, "placeholders, clearly marked"


def test_tensorboard_to_a_uri_uploads_every_flush(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    remote = tmp_path / "bucket" / "run" / "tensorboard"
    tb = TensorBoard(f"file://{remote}")
    assert not str(tb.local).startswith(str(tmp_path)), "events are written locally first"
    tb.add_scalar("loss", 1.0, 1)
    tb.flush()

    def scalars():
        acc = EventAccumulator(str(remote))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("loss")]

    assert scalars() == [(1, 1.0)]
    tb.add_scalar("loss", 0.5, 2)
    tb.close()
    assert scalars() == [(1, 1.0), (2, 0.5)]
    assert not os.path.exists(tb.local), "the local copy is removed"


def test_worker_resource_must_be_a_custom_resource(tiny_dataset):
    from sslab.config import ConfigError
    from sslab.platform.launch import validate
    from sslab.platform.spec import make_spec

    spec = make_spec("simclr", {"data.path": tiny_dataset, "engine.batch_size": 16, "engine.worker_resource": "GPU"})
    with pytest.raises(ConfigError, match="engine.worker_resource"):
        validate(spec, 2)
    validate(make_spec("simclr", {"data.path": tiny_dataset, "engine.batch_size": 16,
                                  "engine.worker_resource": "sslab_node"}), 2)


# ------------------------------------------------------------------ a real cluster: head + 2 nodes on this machine

def _start_cluster(monkeypatch):
    import socket

    import ray
    from ray.cluster_utils import Cluster

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False, gcs_server_port=port)  # the head
        assert cluster.address == address
        nodes = [cluster.add_node(num_cpus=2, resources={"sslab_node": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
    except Exception:
        cluster.shutdown()
        raise
    return cluster, nodes


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Head (1 CPU) and 2 nodes with 2 CPUs and one `sslab_node` unit each. Any shared Ray is shut down first;
    the `local_ray` fixture starts it again for later tests.

    RAY_ADDRESS is set before the cluster starts, as `ray job submit` sets it for a driver: every process of the
    cluster inherits it. Ray processes that look their cluster up (Train's placement-group cleaner queries the
    state API) would otherwise pick the newest of the Ray instances on this shared machine, maybe not this one."""
    import ray

    ray.shutdown()
    for attempt in range(2):
        try:
            cluster, nodes = _start_cluster(monkeypatch)
            break
        except Exception as e:  # Ray gives a node a fixed 30 s to register, too short on an overloaded machine
            if "timed out during startup" not in str(e):
                raise
            if attempt:
                pytest.skip(f"environment: this machine is too loaded for Ray to start 3 nodes ({e})")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray
def test_two_nodes_one_worker_each(two_node_cluster, tiny_dataset, tmp_path):
    import ray
    from ray._private import state

    from sslab.platform.launch import train
    from sslab.platform.spec import make_spec

    cluster, nodes = two_node_cluster  # RAY_ADDRESS points at it, as for a driver `ray job submit` started
    storage = f"file://{tmp_path}/bucket/runs"  # a URI: storage goes through pyarrow, as for s3://
    spec = make_spec("simclr", {"data.path": tiny_dataset, "engine.batch_size": 16, "engine.workers": 2,
                                "engine.cpus_per_worker": 0.5, "engine.epochs": 1, "engine.steps_per_epoch": 2,
                                "engine.knn_k": 10, "engine.worker_resource": "sslab_node", "model.width": 4,
                                "recipe.hidden": 16, "recipe.dim": 8, "data.limit": 32, "data.batch_rows": 32})
    result = train(spec, name="multi", storage=storage, address="auto")

    assert result.error is None
    assert ray.get_runtime_context().gcs_address == cluster.address, "joined the cluster, started nothing"
    m = result.metrics
    assert m["epoch"] == 1 and m["step"] == 2 and math.isfinite(m["loss"])
    assert 0.0 <= m["knn_top1"] <= 1.0  # features extracted on both nodes, gathered across them
    # one Train worker on each node (the custom resource pins them), none on the head
    train_nodes = [a["Address"]["NodeID"] for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    assert sorted(train_nodes) == sorted(n.node_id for n in nodes)
    # checkpoint and TensorBoard events landed under the URI
    run_dir = tmp_path / "bucket" / "runs" / "multi"
    assert torch.load(os.path.join(result.checkpoint.path, STATE_FILE), weights_only=True)["global_step"] == 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))


def slow_second_epoch(marker: str, spe: int):
    """A loop callback: from epoch 2's first step on, write `marker` and take 2 s a step, the first time only, so
    the test can take a node away while epoch 2 runs. Defined in a function: Ray pickles it by value."""
    import time

    from sslab.platform.callbacks import Callback

    class Slow(Callback):
        def on_step_start(self, trainer, step):
            if step >= spe and not os.path.exists(marker + ".done"):
                with open(marker, "a") as f:
                    f.write(f"{trainer.ctx.rank} {step}\n")
                time.sleep(2)

        def on_run_start(self, trainer):
            if os.path.exists(marker):       # the restarted group: run at full speed
                open(marker + ".done", "w").close()

    return Slow()


@pytest.mark.ray
def test_a_lost_node_is_replaced_and_the_run_resumes(two_node_cluster, tiny_dataset, tmp_path, capfd):
    """A node running a Train worker dies mid-epoch (removed without warning); a spare node with the same resource
    takes its place: Train restarts the group from the last checkpoint and the run finishes, every epoch run
    once (the restarted group finds the checkpoint in storage when the node went before Ray's controller took in
    its report). (The spare joins before the run: Ray's test cluster can add nodes from the main thread only.)"""
    import threading
    import time

    from ray._private import state

    from sslab.platform.launch import train
    from sslab.platform.spec import make_spec

    cluster, nodes = two_node_cluster
    nodes.append(cluster.add_node(num_cpus=2, resources={"sslab_node": 1}))
    cluster.wait_for_nodes()
    marker = str(tmp_path / "epoch2")
    spec = make_spec("simclr", {"data.path": tiny_dataset, "engine.batch_size": 16, "engine.workers": 2,
                                "engine.cpus_per_worker": 0.5, "engine.epochs": 2, "engine.steps_per_epoch": 3,
                                "engine.knn_every": 0, "engine.worker_resource": "sslab_node",
                                "engine.max_failures": 1, "model.width": 4, "recipe.hidden": 16, "recipe.dim": 8,
                                "data.limit": 48, "data.batch_rows": 16})
    lost = []

    def lose_a_worker_node():
        deadline = time.monotonic() + 300
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        busy = {a["Address"]["NodeID"] for a in state.actors().values()
                if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}
        lost.append(next(n for n in nodes if n.node_id in busy))
        cluster.remove_node(lost[0], allow_graceful=False)

    killer = threading.Thread(target=lose_a_worker_node, daemon=True)
    killer.start()
    result = train(spec, name="lost-node", storage=str(tmp_path / "runs"), address="auto",
                   worker_callbacks=[slow_second_epoch(marker, spe=3)])
    killer.join(timeout=60)
    assert lost and os.path.exists(marker + ".done"), "a worker's node was lost in epoch 2 and the group restarted"
    assert result.error is None and result.metrics["epoch"] == 2 and result.metrics["step"] == 6
    # the run's own record: Ray's lacks epoch 1 when the node went before Train's controller took that report in
    history = [json.loads(line) for line in open(tmp_path / "runs" / "lost-node" / "metrics.jsonl")]
    assert [(m["epoch"], m["step"]) for m in history] == [(1, 3), (2, 6)], "epoch 1 ran once, epoch 2 from its end"
    out = capfd.readouterr()
    assert "resumed from checkpoint after epoch 1 (step 3)" in out.out + out.err
