"""The Ray engine's connection: `engine.address` unset is a private local Ray, never a cluster that runs on the host."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vb_batch.engines.ray import ray_init_args

PRIVATE = {"address": "local", "include_dashboard": False}


def test_ray_init_args_for_each_address():
    assert ray_init_args(None, {}) == PRIVATE
    assert ray_init_args(None, {"RAY_ADDRESS": ""}) == PRIVATE  # empty: unset
    assert ray_init_args(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == {"address": "10.0.0.5:6379"}
    assert ray_init_args("local", {"RAY_ADDRESS": "10.0.0.5:6379"}) == PRIVATE
    assert ray_init_args("auto", {}) == {"address": "auto"}
    assert ray_init_args("ray://head:10001", {"RAY_ADDRESS": "10.0.0.5:6379"}) == {"address": "ray://head:10001"}


# In a fresh interpreter: connect as the job would for each address, print the cluster joined.
WHICH_CLUSTER = """
import sys, ray
from vb_batch.config import EngineConfig
from vb_batch.engines.ray import connect
for address in sys.argv[1:]:
    assert connect(EngineConfig(kind="ray", address=None if address == "unset" else address))
    print(address, ray.get_runtime_context().gcs_address.rpartition(":")[2], flush=True)
    ray.shutdown()
"""


@pytest.mark.slow
def test_an_unset_address_never_joins_the_ray_running_on_the_host(worker_env):
    """A real `ray start --head`, found the way `ray.init()` finds one; its files in a private temp dir
    (RAY_TMPDIR) so that no other Ray on this host sees it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="vbray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # No token auth (Ray's default for clusters it starts): a client given an address would need the token.
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address_file = Path(temp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 120
        while not address_file.exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert address_file.exists(), "ray start --head did not come up"
        run = subprocess.run([sys.executable, "-c", WHICH_CLUSTER, "unset", "auto"], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        joined = dict(line.split() for line in run.stdout.splitlines())
        assert joined["auto"] == str(port)  # "auto" joins the running cluster
        assert joined["unset"] != str(port)  # unset: a private one (Ray's address=None would join)
        with_env = subprocess.run([sys.executable, "-c", WHICH_CLUSTER, "unset"],
                                  env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                  capture_output=True, text=True, timeout=300, check=False)
        assert with_env.returncode == 0, with_env.stderr[-3000:]
        assert with_env.stdout.split() == ["unset", str(port)]  # RAY_ADDRESS is an explicit choice
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
