"""Ray's local daemons end within seconds of a driver killed with SIGKILL (they used to linger ~2 minutes)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from sslab.platform import reaper

pytestmark = pytest.mark.ray

DRIVER = """
import os, sys, time
from sslab.platform.launch import init_ray
from sslab.platform.reaper import _children, _is_ray
init_ray(None, 1, verbose=False)
ray_pids = [p for p in _children(os.getpid()) if _is_ray(p)]
other = __import__("subprocess").Popen(["sleep", "60"])       # the driver's own child: not Ray's, left alone
print(" ".join(map(str, ray_pids)), other.pid, flush=True)
time.sleep(120)
"""


def _alive(pid, start):
    return reaper.start_time(pid) == start


def test_ray_processes_end_soon_after_the_driver_is_killed(tmp_path):
    env, other = dict(os.environ, RAY_ADDRESS=""), None
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=str(tmp_path))
    try:
        *ray_pids, other = map(int, driver.stdout.readline().split())
        assert len(ray_pids) >= 2, "a local Ray has a GCS and a raylet at least"
        watched = [(p, reaper.start_time(p)) for p in ray_pids]
        workers = [(c, reaper.start_time(c)) for p in ray_pids for c in reaper._children(p)]
        other_start = reaper.start_time(other)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in watched + workers):
            time.sleep(0.25)
        left = [p for p, s in watched + workers if _alive(p, s)]
        assert not left, f"Ray processes still running 15 s after the driver died: {left}"
        assert _alive(other, other_start), "a child of the driver that is not Ray's was stopped"
    finally:
        driver.kill()
        if other is not None and reaper.start_time(other) is not None:
            os.kill(other, signal.SIGKILL)


def test_reap_leaves_a_reused_pid_alone():
    # a process named with another start time (its pid was reused) is not signalled
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        start = reaper.start_time(sleeper.pid)
        assert reaper.reap((2 ** 22 + 1, 0), [(sleeper.pid, start + 1)], grace=0.2) == []      # driver gone
        assert sleeper.poll() is None
        assert reaper.reap((2 ** 22 + 1, 0), [(sleeper.pid, start)], grace=0.5) == [sleeper.pid]
        assert sleeper.wait(timeout=5) is not None
    finally:
        sleeper.kill()


def test_reap_ends_when_the_driver_shuts_its_ray_down():
    # the driver lives on, but the processes it was watching are gone (ray.shutdown()): the reaper exits, signalling
    # nothing, instead of polling until the driver ends (one would pile up per ray.init otherwise)
    sleeper = subprocess.Popen(["sleep", "30"])
    start = reaper.start_time(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    began = time.monotonic()
    assert reaper.reap((os.getpid(), reaper.start_time(os.getpid())), [(sleeper.pid, start)], poll=0.05) == []
    assert time.monotonic() - began < 5
