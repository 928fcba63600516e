"""A local Ray started by sslab keeps to itself: its processes find their own instance even when another Ray
instance runs on the same machine, and it opens no IPv4 port on every interface."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

OTHER = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=True)
print("ready", flush=True)
sys.stdin.read()          # until the test is done
ray.shutdown()
"""

DRIVER = """
import json, ray
from sslab.platform.launch import init_ray

init_ray(None, 1, verbose=False)

@ray.remote(num_cpus=0)
class Marker:
    def ping(self):
        return 1

marker = Marker.options(name="sslab-test-marker").remote()
ray.get(marker.ping.remote())

@ray.remote(num_cpus=0)
def lookup():
    # what Train's placement-group cleaner does in its controller: ask the state API, found by itself
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.util.state import list_actors
    return get_address_for_submission_client(None), [a.name for a in list_actors()]

address, names = ray.get(lookup.remote())

def listening():
    # (address hex, port, process) of every TCP socket listening in this driver's process tree
    import contextlib, os
    from sslab.platform.reaper import _descendants
    owner = {}
    for pid in _descendants([os.getpid()]) | {os.getpid()}:
        with contextlib.suppress(OSError):              # a process gone meanwhile
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = open(f"/proc/{pid}/cmdline", "rb").read().split(bytes(1))[0].decode()
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in open(table).read().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in owner:          # state LISTEN
                ip, port = f[1].split(":")
                out.append((ip, int(port, 16), owner[f[9]]))
    return out

print(json.dumps({"address": address, "names": names, "dashboard": ray._private.worker.get_dashboard_url(),
                  "listening": listening()}), flush=True)
ray.shutdown()
"""


def test_a_local_runs_processes_ask_their_own_ray_with_another_instance_running(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="")
    other = subprocess.Popen([sys.executable, "-c", OTHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env, cwd=str(tmp_path))
    try:
        assert other.stdout.readline().strip() == "ready"
        done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["address"].endswith(seen["dashboard"].rsplit(":", 1)[-1]), seen
        assert "sslab-test-marker" in seen["names"], f"the state API answering is another Ray's: {seen}"
        # no IPv4 listener on every interface: the dashboard is on 127.0.0.1 and Ray's Prometheus endpoint (on
        # 0.0.0.0) is off. (Ray 2.60's gRPC servers still listen on [::]; that needs a newer Ray.)
        port = int(seen["dashboard"].rsplit(":", 1)[-1])
        assert ("0100007F", port) in {(ip, p) for ip, p, _ in seen["listening"]}, seen["listening"]
        wildcard = [(p, who) for ip, p, who in seen["listening"] if ip == "00000000"]
        assert not wildcard, f"listening on every IPv4 interface: {wildcard}"
    finally:
        other.stdin.close()
        other.wait(timeout=60)
