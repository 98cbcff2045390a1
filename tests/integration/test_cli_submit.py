"""`runner submit` and the read verbs as a user runs them: the real `runner` command, which starts the local runner
server and a local Ray head (token auth on) by itself on first use; then the errors a user meets, one line each."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runner.local import free_port
from tiny import keyword_rows, tiny_model_dir

pytestmark = pytest.mark.slow
RUNNER = str(Path(sys.executable).parent / "runner")


@pytest.fixture
def runner(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RUNNER_SERVER", "RUNNER_TOKEN")}
    env.update(RUNNER_HOME=str(home), RUNNER_PORT=str(free_port()))

    def run(*args, timeout=300, **extra):
        return subprocess.run([RUNNER, *args], env={**env, **extra}, capture_output=True, text=True,
                              timeout=timeout, cwd=tmp_path)

    run.home = home
    yield run
    state = json.loads((home / "local.json").read_text()) if (home / "local.json").exists() else {}
    for part in state.values():  # whatever a failed test left running
        try:
            os.kill(part["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_submit_starts_the_local_server_and_ray_and_follows_the_job(runner, tmp_path, tokenizer):
    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(80)))
    good = tmp_path / "good.yaml"
    good.write_text(f"name: cli\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: d.jsonl\n"
                    "  max_seq_len: 16\ntrain:\n  max_steps: 6\n  batch_size: 8\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("max_steps: 6", "max_step: 6"))

    out = runner("submit", str(bad))
    assert out.returncode == 2 and "train.max_step: unknown key (did you mean 'max_steps'?)" in out.stderr
    assert not (runner.home / "local.json").exists(), "a bad recipe starts nothing"

    out = runner("submit", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting a local Ray head" in out.stderr and "starting the local runner server" in out.stderr
    job_id = out.stdout.split()[1]
    assert f"job {job_id} SUCCEEDED" in out.stdout and "test: loss=" in out.stdout and "accuracy=" in out.stdout
    assert "step 6/6" in out.stderr and "RUNNING" in out.stderr
    assert "next: runner artifacts" in out.stdout

    state = json.loads((runner.home / "local.json").read_text())
    try:  # Ray's token auth is on, and the runner holds the token
        urllib.request.urlopen(f"{state['ray']['dashboard']}/api/jobs/", timeout=10)
        raise AssertionError("Ray's dashboard answered without a token")
    except urllib.error.HTTPError as e:
        assert e.code == 401

    listed = json.loads(runner("list", "--json").stdout)
    assert [(j["id"], j["state"]) for j in listed["jobs"]] == [(job_id, "SUCCEEDED")]
    status = runner("status", job_id).stdout
    assert "state:     SUCCEEDED" in status and "QUEUED -> STARTING" in status and "next: " in status
    assert "world size 1" in runner("logs", job_id).stdout
    files = [f["path"] for f in json.loads(runner("artifacts", job_id, "--json").stdout)["files"]]
    assert "model/config.json" in files and "eval.json" in files

    out = runner("dashboard", "--no-open")
    page = out.stdout.split()[1]
    assert out.returncode == 0 and page == f"{state['server']['url']}/ui/jobs"
    with urllib.request.urlopen(page, timeout=10) as r:  # the page the browser would open, with the job in it
        assert r.status == 200 and job_id in r.read().decode()

    out = runner("status", "nope")
    assert out.returncode == 1 and out.stderr.strip() == "no job 'nope' (runner list shows the jobs)"
    out = runner("retry", job_id)
    assert out.returncode == 1 and "only a FAILED or CANCELLED job can be retried" in out.stderr

    # --- the Ray head goes down: with the server named explicitly, one line says so --------------------------------
    server = state["server"]["url"]
    assert runner("cluster", "down").stdout.startswith("local Ray head stopped")
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # a plain ray.init() would look there
    port = state["ray"]["address"].rsplit(":", 1)[-1]
    assert not (current.exists() and current.read_text().strip().endswith(f":{port}")), "stale Ray address left"
    out = runner("submit", "--detach", str(good), RUNNER_SERVER=server)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"the Ray cluster at {state['ray']['dashboard']} does not answer"), out.stderr
    out = runner("list", RUNNER_SERVER=f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and out.stderr.startswith("cannot reach the runner server at http://127.0.0.1:")
    assert runner("server", "stop").stdout.startswith("runner server stopped")
    out = runner("server", "status")
    assert out.returncode == 1 and out.stdout.startswith("no local runner server is running")
