"""Dispatch through the real Ray Jobs API on a local Ray with its dashboard: queueing while the cluster is full,
results and reasons back in the store, metrics copied, refusal of what can never fit."""

import json
import os
import time
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
ray = pytest.importorskip("ray")

from jobs.recipe import parse_recipe  # noqa: E402
from runner.dispatch import Dispatcher, RayJobs  # noqa: E402
from runner.queue import Need  # noqa: E402
from runner.store import Store  # noqa: E402
from tiny import keyword_rows, tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dashboard():
    ctx = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                   object_store_memory=150 * 2**20)
    yield f"http://{ctx.dashboard_url}"
    ray.shutdown()


def add_job(store: Store, root: Path, model: Path, name: str, body: str, rows, task="classification") -> str:
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = parse_recipe(f"name: {name}\nmodel:\n  name: {model}\ntask: {task}\ndata:\n  train: {name}.jsonl\n"
                     f"  max_seq_len: 16\n{body}", base_dir=root, env={})
    job_dir = root / "artifacts" / name
    job_dir.mkdir(parents=True)
    (job_dir / "recipe.yaml").write_text(r.snapshot_yaml())
    res = r.resources
    store.add_job(name, name, r.snapshot_yaml(), str(job_dir), res.workers, res.cpus_per_worker, res.gpus_per_worker)
    return name


def test_jobs_queue_while_full_and_report_back(dashboard, tmp_path, tokenizer):
    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    store = Store(tmp_path / "runner.db")
    d = Dispatcher(store, RayJobs(dashboard))
    whole = "train:\n  max_steps: 6\n  batch_size: 8\nresources:\n  workers: 1\n  cpus_per_worker: 2\n"
    first = add_job(store, tmp_path, model, "first", whole, keyword_rows(80))
    second = add_job(store, tmp_path, model, "second", whole, keyword_rows(80, seed=1))
    bad = add_job(store, tmp_path, model, "diverges", "train:\n  epochs: 3\n  optimizer: sgd\n  lr: 10\n"
                  "  max_grad_norm: null\nresources:\n  workers: 1\n  cpus_per_worker: 2\n",
                  [{"text": r["text"], "label": float(i * 1000)} for i, r in enumerate(keyword_rows(60))],
                  task="regression")

    assert d.refusal(Need(2, 2, 0)).startswith("needs 2 workers x (2 CPUs), which this cluster can never hold "
                                               "(1 node: 1 x (2 CPUs))")
    assert d.tick() == [first], "one job fills the cluster; the others wait"
    assert store.get(second).state == "QUEUED"
    seen_active, order = [], []
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        started = d.tick()
        order += started
        active = [j.id for j in store.list() if j.state in ("STARTING", "RUNNING", "RETRYING", "EXPORTING")]
        seen_active.append(active)
        if all(store.get(j).state in ("SUCCEEDED", "FAILED", "CANCELLED") for j in (first, second, bad)):
            break
        time.sleep(1)
    assert max(len(a) for a in seen_active) == 1, "never two jobs on a cluster that holds one"
    assert order == [second, bad], "then in queue order"
    assert store.get(first).state == "SUCCEEDED" and store.get(second).state == "SUCCEEDED"
    failed = store.get(bad)
    assert failed.state == "FAILED" and failed.reason.startswith("the loss became ")
    steps = [m["step"] for m in store.metrics(first, split="train")]
    assert steps == list(range(1, 7)), "every step's metrics reached the store"
    assert [e["state_to"] for e in store.events(first)] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert [a["submission"] for a in store.attempts(first)] == [f"{first}-1"]
    assert (Path(store.get(first).job_dir) / "model" / "config.json").exists()


def test_server_refuses_what_never_fits_runs_and_cancels(dashboard, tmp_path, tokenizer, monkeypatch):
    import threading
    import urllib.error
    import urllib.request

    import uvicorn
    from ray.util.state import list_actors

    from runner.server import create_app

    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(80)))
    monkeypatch.setenv("RUNNER_TEST_HOOKS", json.dumps({"pause_after_step": 2}))  # the job holds at step 2
    app = create_app(tmp_path / "home", backend=RayJobs(dashboard), interval=0.5)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"

    def call(path, body=None, method=None):
        req = urllib.request.Request(url + path, method=method or ("POST" if body is not None else "GET"),
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    recipe = (f"name: held\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: d.jsonl\n"
              "  max_seq_len: 16\ntrain:\n  max_steps: 50\nresources:\n  workers: {w}\n  cpus_per_worker: 2\n")
    try:
        code, err = call("/jobs", {"recipe": recipe.replace("{w}", "2"), "base_dir": str(tmp_path)})
        assert code == 422 and err["detail"] == ("refused: the job needs 2 workers x (2 CPUs), which this cluster "
                                                 "can never hold (1 node: 1 x (2 CPUs))")
        assert call("/cluster")[1]["cpus"] == 2
        code, job = call("/jobs", {"recipe": recipe.replace("{w}", "1"), "base_dir": str(tmp_path)})
        assert code == 201
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            got = call(f"/jobs/{job['id']}")[1]
            if got["state"] == "RUNNING" and len(call(f"/jobs/{job['id']}/metrics")[1]["metrics"]) >= 2:
                break
            time.sleep(0.5)
        assert got["state"] == "RUNNING"
        assert call("/cluster")[1]["free_cpus"] == 0
        code, _ = call(f"/jobs/{job['id']}/cancel", {})
        assert code == 200
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and call(f"/jobs/{job['id']}")[1]["state"] != "CANCELLED":
            time.sleep(0.5)
        assert call(f"/jobs/{job['id']}")[1]["state"] == "CANCELLED"
        took = time.monotonic() - t0
        for _ in range(40):  # the training workers and their controller go with the job
            alive = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])
                     if "Train" in a.class_name]
            if not alive:
                break
            time.sleep(0.5)
        assert not alive, alive
        assert took < 30, took
        assert call("/cluster")[1]["free_cpus"] == 2, "its resources are free for the next job"
    finally:
        srv.should_exit = True
        t.join(timeout=10)
