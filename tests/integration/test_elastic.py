"""The queue on an autoscaling Ray cluster (bench/elastic.py's: a real head with autoscaler v2 and Ray's fake node
provider; node type gpu2 of 1 CPU and 2 fake GPUs, at most 2 nodes, the head without GPUs): jobs wait for nodes the
runner asks for, run, and the nodes go when the queue is empty; other users' work counts; a node drained under a
job costs it at most the step in flight; a preemptible job gives way to one ahead of it and resumes at its step.
After each test no resource request is left behind (read from Ray's autoscaler state)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import elastic  # noqa: E402

sys.path.remove(str(ROOT / "bench"))

from tiny import keyword_rows, tiny_model_dir  # noqa: E402
from web import wait_for  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = elastic.AutoscalingCluster(tmp_path_factory.mktemp("elastic"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def world(cluster, tmp_path_factory, tokenizer):
    work = tmp_path_factory.mktemp("elastic-jobs")
    model = tiny_model_dir(work / "bert", "bert", tokenizer, weights=True)
    data = work / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(80)))
    srv = elastic.server(work / "home", cluster)
    srv.start()
    yield cluster, srv, model, data
    srv.kill()


@pytest.fixture(autouse=True)
def no_request_left(request):
    yield
    if "world" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        # the server withdraws its request within a pass of the queue emptying
        # the runner withdraws its own within a pass; Ray Train's autoscaling coordinator (which asks for a
        # restarted job's workers) withdraws its own on its next tick (20 s)
        wait_for("no resource request left", lambda: c.request_left() == (0, 0), 45,
                 show=lambda: (c.request_left(), list(c.state().cluster_resource_constraints),
                               c.client().internal_kv_get(b"autoscaler_resource_request", None)))


def submit(srv, body: str, priority: int = 0) -> str:
    code, job = srv.call("/jobs", {"recipe": body, "priority": priority})
    assert code == 201, job
    return job["id"]


def test_jobs_wait_for_nodes_the_runner_asks_for_and_the_nodes_go_when_the_queue_is_empty(world):
    c, srv, model, data = world
    assert c.workers() == []
    code, err = srv.call("/jobs", {"recipe": elastic.recipe(model, data, "huge", gpus=4)})
    assert code == 422, err
    assert err["detail"] == ("refused: the job needs 1 worker x (1 CPU + 4 GPUs), which this cluster can never hold "
                             "(1 node: 1 x (2 CPUs); node types it can add: gpu2 (1 CPUs, 2 GPUs; max 2, 0 now))")
    assert c.autoscaler(run=False) == 1  # a slow cloud: what waits for a node can be looked at
    try:
        a = submit(srv, elastic.recipe(model, data, "a", delay=0.3))
        b = submit(srv, elastic.recipe(model, data, "b", delay=0.3))
        first = wait_for("a's reason", lambda: (srv.job(a).get("waiting_for") or "").startswith("waiting for the")
                         and srv.job(a), 10)
        assert first["waiting_for"] == "waiting for the cluster to add a node of type gpu2", first
        assert srv.job(b)["waiting_for"] == f"waiting for the cluster to add a node of type gpu2 (behind {a})"
        cl = srv.call("/cluster")[1]
        assert cl["node_types"] == [{"name": "gpu2", "cpus": 1.0, "gpus": 2.0, "max": 2, "now": 0, "could_start": 2}]
        assert cl["requests"] == [{"job": a, "node_types": ["gpu2"]}, {"job": b, "node_types": ["gpu2"]}]
        assert c.request_left() == (2, 2), "the runner asked for a node for each (2 bundles of 2 GPUs), v2 and v1"
        out = subprocess.run([sys.executable, "-m", "runner.cli", "cluster", "status"], capture_output=True,
                             text=True, env={**os.environ, "RUNNER_SERVER": srv.url}, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (f"  gpu2  1 CPUs, 2 GPUs each  0 now (max 2), 2 could still start; asked for by {a}, {b}"
                in out.stdout.splitlines()), out.stdout
        assert "resource request: 2 bundles (those in use included)" in out.stdout, out.stdout
        dashboard_shows_node_types(srv.url, [a, b])
    finally:
        c.autoscaler(run=True)
    t0 = time.monotonic()
    wait_for("a running on an added node", lambda: srv.job(a)["state"] == "RUNNING", 120)
    started_after = time.monotonic() - t0
    wait_for("both on their own node", lambda: srv.job(b)["state"] == "RUNNING" and len(c.workers()) == 2, 120)
    for j in (a, b):
        wait_for(f"{j} SUCCEEDED", lambda j=j: srv.job(j)["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 240)
        assert srv.job(j)["state"] == "SUCCEEDED", srv.job(j)
    wait_for("request withdrawn", lambda: c.request_left() == (0, 0), 10)
    t_empty = time.monotonic()
    wait_for("the idle nodes removed", lambda: c.workers() == [], elastic.IDLE_S + 60)
    print(f"first job RUNNING {started_after:.1f} s after submit; nodes gone {time.monotonic() - t_empty:.1f} s "
          "after the queue emptied")


def dashboard_shows_node_types(url: str, jobs: list[str]) -> None:
    """The cluster page in a real browser: the node type, how many could still start, and the jobs that asked."""
    from playwright.sync_api import sync_playwright
    from web import CHROMIUM, CHROMIUM_ARGS as ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/ui/cluster")
            row = page.locator('#types tr[data-type="gpu2"]')
            row.wait_for(timeout=15_000)
            assert row.locator("td.could").inner_text() == "2"
            assert row.locator("td.count").inner_text() == "0 of 2"
            assert [a.inner_text() for a in row.locator("td.asked a").all()] == jobs
            assert "resource request: 2 bundles" in page.locator("#request").inner_text()
        finally:
            browser.close()


OTHER_USER = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_gpus=float(sys.argv[2]), num_cpus=0)
class Holder:
    def ping(self):
        return 1

held = [Holder.remote() for _ in range(int(sys.argv[3]))]
ray.get([h.ping.remote() for h in held])
print("holding", flush=True)
sys.stdin.readline()
"""


def steps_in(job_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (job_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("split", "train") == "train"]


def test_a_drained_node_costs_the_job_at_most_the_step_in_flight(world):
    c, srv, model, data = world
    j = submit(srv, elastic.recipe(model, data, "drained", steps=16, delay=0.4,
                                   resources="  max_failures: 2\n"))
    job_dir = Path(srv.job(j)["job_dir"])
    wait_for("training", lambda: len(steps_in(job_dir)) >= 4 if (job_dir / "metrics.jsonl").exists() else False,
             180)
    held = [n["id"] for n in srv.call("/cluster")[1]["nodes"] if any(h["job"] == j for h in n["held"])]
    assert len(held) == 1, srv.call("/cluster")[1]
    c.drain(held[0])
    ck = wait_for("a checkpoint asked of the workers", lambda: [
        line for line in (job_dir / "train.log").read_text().splitlines() if "as the server asked" in line], 30)
    time.sleep(1.5)  # a few more steps, each checkpointed while the node drains
    assert c.kill_node(held[0]) > 0
    reached = max(steps_in(job_dir))
    wait_for("resumed and done", lambda: srv.job(j)["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 300)
    job = srv.job(j)
    assert job["state"] == "SUCCEEDED", job
    written = steps_in(job_dir)
    redone = len(written) - len(set(written))
    assert redone <= 1, f"steps redone after the node went: {redone} ({ck[0]}; reached {reached})"
    stored = [m["step"] for m in srv.call(f"/jobs/{j}/metrics?split=train")[1]["metrics"]]
    assert stored == list(range(1, 17)), "the store shows every step once"
    events = [e["message"] for e in srv.call(f"/jobs/{j}/events")[1]["events"]]
    assert any("is being drained" in (m or "") for m in events), events


def test_other_users_work_counts_and_a_preemptible_job_gives_way_to_one_ahead(world, tmp_path):
    """Another Ray user's actors hold 3 of the 4 GPUs the cluster can have (both nodes): a preemptible job waits,
    saying so, and starts when one actor ends, never FAILED. The cluster is then at its max; a job of a higher
    priority arrives: the preemptible job checkpoints, stops and goes back to the queue; the other starts in its
    place; then it resumes at its step and finishes, each step in the store once."""
    c, srv, model, data = world
    script = tmp_path / "other.py"
    script.write_text(OTHER_USER)
    users = []

    def hold(gpus: str):
        p = subprocess.Popen([sys.executable, str(script), c.gcs, gpus, "1"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        users.append(p)
        assert p.stdout.readline().strip() == "holding"
        return p

    try:
        hold("2")
        small = hold("1")
        assert len(c.workers()) == 2
        cl = wait_for("the runner sees the actors", lambda: (lambda x: x if x["free_gpus"] == 1 else None)(
            srv.call("/cluster")[1]), 10, show=lambda: srv.call("/cluster")[1])
        assert [t["could_start"] for t in cl["node_types"]] == [0], cl
        spot = submit(srv, elastic.recipe(model, data, "spot", steps=24, delay=0.4,
                                          resources="  preemptible: true\n"))
        spot_dir = Path(srv.job(spot)["job_dir"])
        got = wait_for("the reason", lambda: "held by others" in (srv.job(spot).get("waiting_for") or "") and
                       srv.job(spot), 15, show=lambda: (srv.job(spot)["state"], srv.job(spot).get("waiting_for"),
                                                srv.call("/cluster")[1]["requests"]))
        # 4 GPUs in all, 3 held by the other user's actors (which ask for no CPU): 1 free
        assert got["waiting_for"] == ("needs 2 GPUs, 1 free; the cluster's free GPUs are held by others (3 GPUs, "
                                      "0 CPUs held by other Ray users)"), got
        time.sleep(2)
        assert srv.job(spot)["state"] == "QUEUED"
        small.stdin.close()
        small.wait(30)
        wait_for("spot training once the actor is gone",
                 lambda: (spot_dir / "metrics.jsonl").exists() and len(steps_in(spot_dir)) >= 3, 180)
        assert len(c.workers()) == 2, "the cluster is at its max: no node can be added for the next job"
        urgent = submit(srv, elastic.recipe(model, data, "urgent"), priority=10)
        wait_for("spot back in the queue", lambda: srv.job(spot)["state"] == "QUEUED", 120)
        stopped_at = max(steps_in(spot_dir))
        wait_for("urgent done", lambda: srv.job(urgent)["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 300)
        assert srv.job(urgent)["state"] == "SUCCEEDED", srv.job(urgent)
        wait_for("spot done", lambda: srv.job(spot)["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 300)
    finally:
        for p in users:
            if p.poll() is None:
                p.stdin.close()
                p.wait(30)
    job = srv.job(spot)
    assert job["state"] == "SUCCEEDED", job
    events = [(e["state_to"], e["message"] or "") for e in srv.call(f"/jobs/{spot}/events")[1]["events"]]
    assert any(to == "QUEUED" and f"preempted for {urgent}" in m and f"stopped at step {stopped_at}" in m
               for to, m in events), events
    assert not any(to == "FAILED" for to, _ in events)
    written = steps_in(spot_dir)
    # it stopped at a checkpoint of the step it reached (stopped_at), and went on from there: no step twice
    assert len(written) - len(set(written)) == 0 and stopped_at < 24, (stopped_at, written)
    stored = [m["step"] for m in srv.call(f"/jobs/{spot}/metrics?split=train")[1]["metrics"]]
    assert stored == list(range(1, 25))
