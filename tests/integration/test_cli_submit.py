"""`runner submit` and the read verbs as a user runs them: the real `runner` command, which starts the local runner
server and a local Ray head (token auth on) by itself on first use; scheduled retraining and the model registry on
the same server; then the errors a user meets, one line each.

Registry, end to end: the submitted job (registered as `topics`, exported to ONNX) is version 1, the first champion.
A schedule on a better recipe (more steps) fires by itself when its training data changes (the server firing a due
cron slot is test_schedule_cli's, with a fake clock), while a worse recipe (the same, on shuffled labels) is
submitted beside it: the gate promotes the better and refuses the worse, both judged on the same test file by test
loss. Rollback puts version 1 back."""

import json
import random
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runner.local import free_port
from tiny import keyword_rows, tiny_model_dir

pytestmark = pytest.mark.slow


def recipe(model, train: str, steps: int, extra: str = "") -> str:
    return (f"name: topics\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {train}\n"
            f"  test: test.jsonl\n  max_seq_len: 16\ntrain:\n  max_steps: {steps}\n  batch_size: 8\n  lr: 0.003\n"
            "resources:\n  workers: 1\n  cpus_per_worker: 1\nexport:\n  onnx: true\n  quantize: none\n"
            f"register_as: topics\npromotion:\n  metric: loss\n{extra}")


def wait_ended(runner, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = json.loads(runner("status", job_id, "--json").stdout)
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        time.sleep(3)  # each look starts the CLI: on 2 cores, looking often slows the training looked at
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def test_submit_schedule_and_registry_through_the_cli(runner, tmp_path, tokenizer):
    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    rows = keyword_rows(240)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:200]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[200:]))
    labels = [r["label"] for r in rows[:200]]
    random.Random(1).shuffle(labels)
    (tmp_path / "shuffled.jsonl").write_text("".join(json.dumps({**r, "label": y}) + "\n"
                                                     for r, y in zip(rows[:200], labels)))
    good = tmp_path / "good.yaml"
    good.write_text(recipe(model, "d.jsonl", 60))
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("max_steps: 60", "max_step: 60"))

    out = runner("submit", str(bad))
    assert out.returncode == 2 and "train.max_step: unknown key (did you mean 'max_steps'?)" in out.stderr
    assert not (runner.home / "local.json").exists(), "a bad recipe starts nothing"

    out = runner("submit", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting a local Ray head" in out.stderr and "starting the local runner server" in out.stderr
    job_id = out.stdout.split()[1]
    assert f"job {job_id} SUCCEEDED" in out.stdout and "test:      loss=" in out.stdout and "accuracy=" in out.stdout
    assert "step 60/60" in out.stderr and "RUNNING" in out.stderr
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
    assert "1 worker on CPUs" in runner("logs", job_id).stdout
    files = [f["path"] for f in json.loads(runner("artifacts", job_id, "--json").stdout)["files"]]
    assert "model/config.json" in files and "eval.json" in files

    out = runner("dashboard", "--no-open")
    page = out.stdout.split()[1]
    assert out.returncode == 0 and page == f"{state['server']['url']}/ui/jobs"
    with urllib.request.urlopen(page, timeout=10) as r:  # the page the browser would open, with the job in it
        assert r.status == 200 and job_id in r.read().decode()

    # --- the model registry and a schedule ---------------------------------------------------------------------------
    shown = json.loads(runner("models", "show", "topics", "--json").stdout)
    assert shown["aliases"] == {"champion": 1} and shown["versions"][0]["job_id"] == job_id
    assert shown["versions"][0]["decision"].startswith("promoted to champion: the first version")
    better, worse = tmp_path / "better.yaml", tmp_path / "worse.yaml"
    better.write_text(recipe(model, "d.jsonl", 200, "schedule:\n  on_data_change: true\n  poll_interval: 10\n"))
    worse.write_text(recipe(model, "shuffled.jsonl", 200))
    out = runner("schedule", "add", str(better))
    assert out.returncode == 0 and "schedule topics: when the data changes" in out.stdout, out.stdout + out.stderr
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text() + json.dumps(rows[0]) + "\n")
    out = runner("submit", "--detach", str(worse), "--name", "worse")  # trains beside the scheduled run
    assert out.returncode == 0, out.stdout + out.stderr
    ids = {"worse": out.stdout.split()[1]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "better" not in ids:  # the server looks at the data every 10 s
        fires = json.loads(runner("schedule", "show", "topics", "--json").stdout)["fires"]
        if fires:
            assert fires[0]["outcome"] == "submitted" and fires[0]["reason"].startswith("the data changed")
            ids["better"] = fires[0]["job_id"]
        time.sleep(2)
    assert "better" in ids, "the data changed and the schedule did not fire in 60 s"
    for jid in ids.values():
        assert wait_ended(runner, jid)["state"] == "SUCCEEDED"
    shown = json.loads(runner("models", "show", "topics", "--json").stdout)
    by_job = {v["job_id"]: v for v in shown["versions"]}
    good_v, bad_v = by_job[ids["better"]], by_job[ids["worse"]]
    assert good_v["promoted"] and good_v["decision"].startswith("promoted to champion: loss "), good_v["decision"]
    assert not bad_v["promoted"] and bad_v["decision"].startswith("not promoted: loss "), bad_v["decision"]
    assert good_v["value"] < shown["versions"][0]["value"] < bad_v["value"]
    assert shown["aliases"] == {"champion": good_v["version"]} and good_v["export"] == {"passed": True}
    out = runner("models", "rollback", "topics")
    assert out.stdout.startswith(f"topics:champion rolled back from v{good_v['version']} to v1"), out.stdout
    assert json.loads(runner("models", "show", "topics", "--json").stdout)["aliases"] == {"champion": 1}
    text = runner("models", "show", "topics").stdout
    assert "v1 [champion]" in text and "rolled back" in text
    d = runner("models", "diff", "topics", "1", str(good_v["version"])).stdout
    assert "same test data: yes" in d and "max_steps: 200" in d
    fires = json.loads(runner("schedule", "show", "topics", "--json").stdout)["fires"]
    assert [(f["outcome"], f["job_id"]) for f in fires] == [("submitted", ids["better"])]  # once for one change

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
