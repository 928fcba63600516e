"""The documented cluster path, end to end on this machine: a head started by `ray start --head`, a run submitted
with `ray job submit` (issue #19). Ray 2.60's `ray start --head` turns token authentication on by itself when the
machine has a token (~/.ray/auth_token, which any local `ray.init()` -- a `sslab train` without `--address` --
writes); `ray job submit` then needs RAY_AUTH_MODE=token and the token, or the dashboard refuses the submission."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_processes(sid: int) -> list[int]:
    """Processes of the session the head was started in (it gets one of its own): ours and nobody else's."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
                pids.append(int(entry))
    return pids


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{open(log).read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=5)
            return
        except urllib.error.HTTPError:  # 401: up, and asking for a token
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the dashboard did not answer in {timeout:.0f} s:\n{open(log).read()[-3000:]}")


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """`ray start --head` on localhost, on free ports, with a token in ~/.ray/auth_token as on a laptop where sslab
    has run locally (HOME is a temp dir: the machine's own ~/.ray is left alone). Yields (dashboard URL, HOME)."""
    base = tmp_path_factory.mktemp("jobs")
    home = base / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["HOME"] = str(home)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    assert (home / ".ray" / "auth_token").is_file()

    # Ray's unix sockets live under --temp-dir and their paths must stay under ~107 characters: a short dir in /tmp
    temp_dir = tempfile.mkdtemp(prefix="sslab-job-", dir="/tmp")
    port, dash, client, agent, metrics = _free_ports(5)
    head_env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM (no 30 s drain)
                    PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))  # jobs import this sslab
    log = str(base / "head.log")
    with open(log, "w") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=head_env, cwd=str(base), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(url, head, log)
        assert "Token authentication is enabled" in open(log).read()
        yield url, str(home), base
    finally:
        # SIGTERM to `ray start --block` stops the head's processes; then anything left in its session
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_processes(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(url: str, home: str, argv: list[str], token: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["HOME"] = home
    if token:
        env["RAY_AUTH_MODE"] = "token"  # the token itself: $HOME/.ray/auth_token
    return subprocess.run([RAY, "job", "submit", "--address", url, "--"] + argv, env=env, capture_output=True,
                          text=True, timeout=600)


def _train_argv(data: str, storage: str) -> list[str]:
    return [sys.executable, "-m", "sslab.cli", "train", "simclr", "--data", data, "--epochs", "1",
            "--batch-size", "16", "--workers", "1", "--name", "job", "engine.steps_per_epoch=2", "engine.knn_k=10",
            "model.width=4", "--storage", storage]


@pytest.mark.ray
def test_job_submit_needs_the_token_environment(token_head, tiny_dataset):
    url, home, base = token_head
    storage = str(base / "runs")

    refused = _submit(url, home, _train_argv(tiny_dataset, storage), token=False)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out
    assert "AuthenticationError" in out and "Missing authentication token" in out, out[-3000:]
    assert not os.path.exists(os.path.join(storage, "job")), "nothing ran"

    started = time.monotonic()
    done = _submit(url, home, _train_argv(tiny_dataset, storage), token=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "finished 1 epochs" in out and "succeeded" in out, out[-5000:]
    assert any(n.startswith("checkpoint_") for n in os.listdir(os.path.join(storage, "job"))), out[-3000:]
    print(f"job trained in {time.monotonic() - started:.0f} s")
