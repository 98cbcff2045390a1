"""cluster/local.sh round trip: up with fake GPUs, the runner's queue sees them, status, down, nothing left."""

import os
import subprocess
from pathlib import Path

import pytest

from runner.local import alive, read_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_local_sh_up_status_down(runner):
    env = {**os.environ, "RUNNER_HOME": str(runner.home), "RUNNER_PORT": "0"}
    for k in ("RAY_ADDRESS", "RUNNER_SERVER", "RAY_AUTH_MODE"):
        env.pop(k, None)

    def sh(*args):
        return subprocess.run([str(ROOT / "cluster" / "local.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=180)

    assert sh("status").returncode == 3
    up = sh("up", "--gpus", "2", "--cpus", "2")
    assert up.returncode == 0, up.stderr
    assert "1 node: 2 CPUs, 2 GPUs" in up.stdout
    head = read_state(runner.home)["ray"]["pid"]
    assert alive(head)
    st = sh("status")
    assert st.returncode == 0 and "2 GPUs" in st.stdout and "runner server: not running" in st.stdout
    # a read verb starts nothing: no server yet, one line says how to start one
    out = runner("cluster", "status")
    assert out.returncode == 1 and "runner server start" in out.stderr and "runner server: not running" in \
        sh("status").stdout
    # the runner's queue places jobs on the fake GPUs: `runner server start` starts the server on this head
    assert runner("server", "start").returncode == 0
    out = runner("cluster", "status", "--json")
    assert out.returncode == 0, out.stderr
    assert '"gpus": 2' in out.stdout.replace(".0", "") and read_state(runner.home)["ray"]["pid"] == head
    again = sh("up", "--gpus", "4")
    assert again.returncode == 0 and "already running" in again.stdout
    down = sh("down")
    assert down.returncode == 0 and "runner server stopped" in down.stdout and "Ray head stopped" in down.stdout
    assert not alive(head)
    assert sh("status").returncode == 3
