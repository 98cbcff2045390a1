"""The dispatcher's elastic decisions over the real store, with Ray's GCS and Jobs API replaced by a recording
stand-in (Ray is the edge here; tests/integration/test_elastic.py runs the same code on a real autoscaling
cluster): the resource request set and withdrawn, a drained node's job asked to checkpoint, a preempted job queued
again at its step, a job stopped past resources.max_minutes, a bound measured on earlier runs; and the node types
read from cluster configs, hostile ones refused with the key named."""

import json
from pathlib import Path

import pytest

from jobs.jobdir import CONTROL, PREEMPTED, read_control
from runner.dispatch import Dispatcher, terms_of
from runner.elastic import ClusterView, ConfigError, node_types, read_config
from runner.queue import Node, NodeType
from runner.store import Store

ROOT = Path(__file__).resolve().parents[2]


class FakeClient:
    """Ray's GcsClient at the edge: what the runner writes to the request, as the GCS would hold it."""

    def __init__(self):
        self.constraint: list[dict] = []  # [{resources, count}]
        self.kv: dict = {}

    def request_cluster_resource_constraint(self, bundles, selectors, counts, timeout_s=None):
        self.constraint = [{"resources": b, "count": n} for b, n in zip(bundles, counts)]

    def internal_kv_put(self, key, value, overwrite, namespace, timeout=None):
        self.kv[key] = value


def fake_gcs():
    from runner.elastic import Gcs

    g = Gcs("gcs:6379")
    g._client = FakeClient()
    g.calls = []
    write = g._write

    def recorded(bundles, ours):
        g.calls.append(list(bundles))
        write(bundles, ours)

    g._write = recorded
    return g


class FakeElasticRay:
    """Ray's Jobs API and GCS as the dispatcher sees them: a head, and what the test says the autoscaler has."""

    def __init__(self):
        self.jobs: dict[str, str] = {}
        self.gcs = fake_gcs()
        self.nodes_now = [Node("head", 2, 0)]
        self.free_now = [Node("head", 2, 0)]
        self.types = [NodeType("gpu2", 1, 2, 2)]
        self.draining: set[str] = set()
        self.held: dict[str, dict[str, tuple[float, float]]] = {}  # submission -> node -> (cpus, gpus)
        self.stopped: list[str] = []

    def view(self):
        return ClusterView(self.nodes_now, self.free_now, self.types, set(self.draining),
                           request=list(self.gcs.client.constraint))

    def nodes(self):
        return self.nodes_now

    def details(self):
        return {"nodes": [{"id": n.id, "held": [{"submission": s, "cpus": h[n.id][0], "gpus": h[n.id][1]}
                                                for s, h in self.held.items() if n.id in h]} for n in self.nodes_now]}

    def submit(self, sid, job_dir, env, fresh=False):
        self.jobs[sid] = "RUNNING"

    def status(self, sid):
        return self.jobs[sid], ""

    def stop(self, sid):
        self.stopped.append(sid)
        self.jobs[sid] = "STOPPED"


class Clock:
    t = 1_000_000.0

    def __call__(self):
        return self.t


def fixed_node(ray) -> None:
    """A fixed cluster (no autoscaler): the head and one node of 1 CPU and 2 GPUs, all free."""
    ray.types = []
    ray.nodes_now.append(Node("n1", 1, 2))
    ray.free_now.append(Node("n1", 1, 2))


RECIPE = "name: {name}\nresources:\n  workers: 1\n  gpus_per_worker: 2\n{extra}train:\n  max_steps: 100\n"


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "runner.db", clock=clock)
    ray = FakeElasticRay()

    def add(job_id, extra="", gpus=2, priority=0):
        job_dir = tmp_path / job_id
        job_dir.mkdir()
        store.add_job(job_id, job_id.rstrip("0123456789"), RECIPE.format(name=job_id, extra=extra), str(job_dir),
                      1, 1, gpus, priority=priority)
        clock.t += 1
        return job_dir

    return store, ray, clock, add, Dispatcher(store, ray, env={}, clock=clock)


def test_a_job_waiting_for_a_node_sets_the_request_and_it_is_withdrawn_once_it_starts(world):
    store, ray, clock, add, d = world
    add("a")
    assert d.tick() == []
    assert d.waiting["a"] == (1, "waiting for the cluster to add a node of type gpu2")
    assert ray.gcs.calls == [[{"CPU": 1.0, "GPU": 2.0}]]  # nothing in use yet: the job's own bundle
    d.tick()
    assert len(ray.gcs.calls) == 1, "set only when it changes"
    ray.nodes_now.append(Node("n1", 1, 2, type="gpu2"))
    ray.free_now.append(Node("n1", 1, 2, type="gpu2"))
    ray.types = [NodeType("gpu2", 1, 2, 2, count=1)]
    assert d.tick() == ["a"]
    assert ray.gcs.calls[-1] == [], "withdrawn: nothing waits for a node"
    # a second job while a holds n1: the request holds what is in use (n1's 2 GPUs) and the new job's bundle,
    # since the autoscaler fits a request against the nodes' totals
    ray.free_now[1] = Node("n1", 0, 0, type="gpu2")
    ray.held["a-1"] = {"n1": (1.0, 2.0)}
    add("b")
    d.tick()
    assert ray.gcs.calls[-1] == [{"CPU": 1.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 2.0}]
    assert [e["message"] for e in store.events("b")][-1].startswith("asked the autoscaler for gpu2")


def test_capacity_others_hold_is_not_the_runners_to_give(world):
    store, ray, clock, add, d = world
    ray.types = [NodeType("gpu2", 1, 2, 1, count=1)]  # the one node the type allows is up
    ray.nodes_now.append(Node("n1", 1, 2, type="gpu2"))
    ray.free_now.append(Node("n1", 1, 1, type="gpu2"))  # another user's actor holds a GPU: Ray says 1 free
    add("a")
    assert d.tick() == []
    assert d.waiting["a"][1] == ("needs 2 GPUs, 1 free; the cluster's free GPUs are held by others (1 GPUs, 0 CPUs "
                                 "held by other Ray users)")
    assert ray.gcs.calls == [], "nothing to ask the autoscaler for"


def test_a_job_on_a_drained_node_is_asked_to_checkpoint_each_step_until_the_node_is_gone(world):
    store, ray, clock, add, d = world
    ray.nodes_now.append(Node("n1", 1, 2, type="gpu2"))
    ray.free_now.append(Node("n1", 1, 2, type="gpu2"))
    job_dir = add("a")
    assert d.tick() == ["a"]
    ray.free_now[1] = Node("n1", 0, 0, type="gpu2")
    ray.held["a-1"] = {"n1": (1.0, 2.0)}
    ray.draining.add("n1")
    d.tick()
    assert read_control(job_dir) == {"checkpoint": True, "stop": False, "why": "node n1 is being drained",
                                     "attempt": 1}
    assert "is being drained" in store.events("a")[-1]["message"]
    ray.draining.clear()  # gone (or the drain was called off): the workers are asked nothing any more
    del ray.held["a-1"]
    d.tick()
    assert not (job_dir / CONTROL).exists()


def preempting(world):
    """spot (preemptible) trains on the one node; urgent, of a higher priority, arrives: spot is asked to stop."""
    store, ray, clock, add, d = world
    fixed_node(ray)
    spot_dir = add("spot", extra="  preemptible: true\n")
    assert d.tick() == ["spot"]
    ray.free_now[1] = Node("n1", 0, 0)
    ray.held["spot-1"] = {"n1": (1.0, 2.0)}
    add("urgent", priority=5)
    d.tick()
    assert read_control(spot_dir)["stop"] is True
    return spot_dir


def test_a_preempted_job_goes_back_to_the_queue_at_its_step_behind_the_job_it_gave_way_to(world):
    store, ray, clock, add, d = world
    spot_dir = preempting(world)
    assert d.waiting["urgent"][1] == "waiting for preemptible job spot to checkpoint and stop"
    (spot_dir / PREEMPTED).write_text(json.dumps({"step": 7}))  # rank 0, at the checkpoint of step 7
    ray.jobs["spot-1"] = "SUCCEEDED"  # its driver ended without testing or exporting
    del ray.held["spot-1"]
    ray.free_now[1] = Node("n1", 1, 2)
    assert d.tick() == ["urgent"]
    spot = store.get("spot")
    assert spot.state == "QUEUED" and spot.resume == 1
    assert "stopped at step 7 and queued again" in store.events("spot")[-1]["message"]
    assert not (spot_dir / PREEMPTED).exists() and not (spot_dir / CONTROL).exists()
    assert d.waiting["spot"][1].startswith("needs 2 GPUs, 0 free"), "behind urgent, by priority"


def test_a_job_past_its_max_minutes_is_stopped_and_failed_with_that_reason(world):
    store, ray, clock, add, d = world
    fixed_node(ray)
    add("a", extra="  max_minutes: 2\n")
    assert d.tick() == ["a"]
    clock.t += 119
    d.tick()
    assert ray.stopped == []
    clock.t += 2
    d.tick()
    assert ray.stopped == ["a-1"]
    d.tick()
    job = store.get("a")
    assert job.state == "FAILED" and job.reason.startswith("ran past resources.max_minutes (2): stopped after 2.0")


def test_a_bound_from_earlier_runs_of_the_recipe(world):
    """Two earlier runs of recipe 'r': 300 s for 50 steps and 500 s for 100 steps. For max_steps 100 the bound is
    the longest, each scaled to 100 steps (600 s and 500 s), plus a quarter: 750 s."""
    store, ray, clock, add, d = world
    for job_id, wall, steps in (("r1", 300, 50), ("r2", 500, 100)):
        add(job_id)
        store.set_state(job_id, "STARTING", expect="QUEUED")
        store.set_state(job_id, "RUNNING")
        store.add_metrics(job_id, [{"step": steps, "total_steps": steps, "loss": 1.0}])
        clock.t += wall
        store.set_state(job_id, "SUCCEEDED")
    add("r3")
    assert d.bound(store.get("r3")) == (750.0, "earlier runs of r scaled to 100 steps, plus a quarter")
    add("other")
    assert d.bound(store.get("other")) == (None, "")


def test_terms_of_a_snapshot_that_is_not_one_read_as_none():
    assert terms_of("resources:\n  max_minutes: 5\n  preemptible: true\ntrain:\n  max_steps: 9\n").max_minutes == 5
    for bad in ("[1, 2", "- a\n- b\n", "resources: 7\n", "resources:\n  max_minutes: .nan\n",
                "resources:\n  max_minutes: true\n  preemptible: 'yes'\n", "train:\n  max_steps: -3\n"):
        t = terms_of(bad)
        assert (t.max_minutes, t.preemptible, t.max_steps) == (None, False, None), bad


def test_node_types_from_the_projects_own_cluster_configs():
    import yaml

    # cluster/ray-cluster.yaml: gpu_worker, 48 CPUs and 4 GPUs, max 4 (the head type is not one the runner can add)
    assert read_config(ROOT / "cluster" / "ray-cluster.yaml") == [NodeType("gpu_worker", 48, 4, 4)]
    # cluster/kuberay/raycluster.yaml: group gpu, its container's limits (48 CPUs, 4 GPUs), maxReplicas 8
    doc = next(d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
               if d and d.get("kind") == "RayCluster")
    assert node_types(doc) == [NodeType("gpu", 48, 4, 8)]
    # rayStartParams win over the container's limits, and Kubernetes' milli-CPUs are read
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-cpus": "500m"}
    assert node_types(doc)[0].cpus == 0.5


@pytest.mark.parametrize("text, words", [
    ("- 1\n", "a YAML mapping is expected, not list"),
    ("foo: 1\n", "neither a RayCluster"),
    ("available_node_types:\n  w:\n    resources: {GPU: lots}\n", "available_node_types.w.resources.GPU: 'lots'"),
    ("available_node_types:\n  w:\n    resources: {CPU: -1}\n", "available_node_types.w.resources.CPU: '-1' is out"),
    ("available_node_types:\n  w: 3\n", "available_node_types.w: a mapping is expected"),
    ("kind: RayCluster\nspec:\n  workerGroupSpecs: 5\n", "spec.workerGroupSpecs must be a list"),
    ("kind: RayCluster\nspec:\n  workerGroupSpecs: [{maxReplicas: 2}]\n", "workerGroupSpecs[0]: a group with a"),
    ("a: [unclosed\n", "not YAML"),
])
def test_a_cluster_config_that_cannot_give_node_types_is_refused_by_key(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_config(path)
    assert str(e.value).startswith(f"RUNNER_CLUSTER_CONFIG={path}: ") and words in str(e.value), str(e.value)


def test_a_cluster_config_too_big_or_absent_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        read_config(big)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_config(tmp_path / "nowhere.yaml")


def test_an_attempt_starts_with_no_request_or_preemption_left_by_an_earlier_one(world):
    """A server that died mid-preemption leaves control.json (stop) and preempted.json behind; a `runner retry`
    must not stop at its first step nor be requeued as preempted when it succeeds."""
    store, ray, clock, add, d = world
    fixed_node(ray)
    job_dir = add("a")
    (job_dir / CONTROL).write_text(json.dumps({"checkpoint": True, "stop": True, "why": "old", "attempt": 1}))
    (job_dir / PREEMPTED).write_text(json.dumps({"step": 3}))
    assert d.tick() == ["a"]
    assert not (job_dir / CONTROL).exists() and not (job_dir / PREEMPTED).exists()
    ray.jobs["a-1"] = "SUCCEEDED"
    d.tick()
    assert store.get("a").state == "SUCCEEDED"


def test_a_cancel_while_a_job_is_being_preempted_is_a_cancel(world):
    store, ray, clock, add, d = world
    spot_dir = preempting(world)
    d.cancel(store.get("spot"))
    assert not (spot_dir / CONTROL).exists()
    d.tick()
    assert store.get("spot").state == "CANCELLED", "the user's cancel, not a requeue"


def test_a_drain_that_ends_leaves_a_preemptions_stop_request_in_place(world):
    store, ray, clock, add, d = world
    spot_dir = preempting(world)
    ray.draining.add("n1")
    d.tick()
    ray.draining.clear()
    d.tick()
    assert read_control(spot_dir)["stop"] is True


def test_a_preempted_job_that_does_not_stop_is_stopped_through_ray_and_resumes_from_its_last_checkpoint(world):
    from runner.dispatch import PREEMPT_GRACE_S

    store, ray, clock, add, d = world
    spot_dir = preempting(world)
    (spot_dir / "checkpoints" / "checkpoint_000001").mkdir(parents=True)
    (spot_dir / "checkpoints" / "checkpoint_000001" / "step.json").write_text('{"step": 4}')
    (spot_dir / "checkpoints" / "checkpoint_000001" / "state.pt").write_bytes(b"weights")
    clock.t += PREEMPT_GRACE_S - 5
    d.tick()
    assert ray.stopped == []
    clock.t += 10
    d.tick()
    assert ray.stopped == ["spot-1"]
    d.tick()
    spot = store.get("spot")
    assert spot.state == "QUEUED" and spot.resume == 1, spot
    assert "stopped at its last checkpoint and queued again" in store.events("spot")[-1]["message"]


def test_a_job_that_says_it_was_preempted_when_it_was_not_fails(world):
    store, ray, clock, add, d = world
    fixed_node(ray)
    job_dir = add("a")
    d.tick()
    (job_dir / PREEMPTED).write_text(json.dumps({"step": 2}))  # its own code wrote it, to go back in the queue
    ray.jobs["a-1"] = "SUCCEEDED"
    d.tick()
    job = store.get("a")
    assert job.state == "FAILED" and "the server did not preempt it" in job.reason


def test_a_folder_planted_where_the_server_writes_or_removes_never_stops_the_pass(world):
    store, ray, clock, add, d = world
    fixed_node(ray)
    a = add("a")
    (a / CONTROL).mkdir()
    (a / PREEMPTED).mkdir()
    assert d.tick() == ["a"], "submitted all the same"


class BrokenGcs(FakeElasticRay):
    def view(self):
        raise RuntimeError("GCS answered garbage")


def test_a_gcs_that_does_not_answer_costs_the_elastic_view_never_the_jobs(tmp_path):
    from runner.dispatch import GCS_GRACE_S, LOST_AFTER

    clock = Clock()
    store = Store(tmp_path / "runner.db", clock=clock)
    ray = BrokenGcs()
    ray.nodes_now = [Node("head", 2, 0), Node("n1", 1, 2)]
    (tmp_path / "a").mkdir()
    store.add_job("a", "a", RECIPE.format(name="a", extra=""), str(tmp_path / "a"), 1, 1, 2)
    d = Dispatcher(store, ray, env={}, clock=clock)
    assert d.tick() == [], "what is free is not known: nothing starts (a blip is waited out)"
    clock.t += GCS_GRACE_S + 1
    assert d.tick() == ["a"], "then planned from Ray's node list, as the cluster's only user"
    clock.t += LOST_AFTER * 3
    d.tick()
    assert store.get("a").state == "RUNNING", "the jobs are followed through Ray's Jobs API all the same"
    assert "gcs" in d.trouble


def test_a_server_refuses_to_start_on_a_cluster_config_it_cannot_read(tmp_path, monkeypatch):
    from runner.server import main

    bad = tmp_path / "c.yaml"
    bad.write_text("available_node_types:\n  'w;rm -rf': {resources: {GPU: 1}}\n")
    monkeypatch.setenv("RUNNER_CLUSTER_CONFIG", str(bad))
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    assert main(["--port", "1", "--ray", "http://127.0.0.1:9", "--ray-gcs", "127.0.0.1:9"]) == 2


def test_the_runners_request_sits_beside_what_others_asked_for_and_is_written_again_when_taken_out(world):
    """Ray keeps one resource request a cluster; Ray Train's autoscaling coordinator writes it too. The runner adds
    its bundles to what is there, withdraws only its own, and writes them again if another write took them out."""
    store, ray, clock, add, d = world
    theirs = {"resources": {"CPU": 4.0}, "count": 1}
    ray.gcs.client.constraint = [theirs]  # another requester's, before the runner's first pass
    add("a")
    d.tick()
    assert sorted(map(str, ray.gcs.client.constraint)) == sorted(map(str, [
        theirs, {"resources": {"CPU": 1.0, "GPU": 2.0}, "count": 1}]))
    ray.gcs.client.constraint = []  # the coordinator's tick wrote its own (now empty) request over it
    d.tick()
    assert ray.gcs.client.constraint == [{"resources": {"CPU": 1.0, "GPU": 2.0}, "count": 1}], "written again"
    ray.gcs.client.constraint = [theirs]  # the coordinator again, with a request of its own
    d.tick()
    assert sorted(map(str, ray.gcs.client.constraint)) == sorted(map(str, [
        theirs, {"resources": {"CPU": 1.0, "GPU": 2.0}, "count": 1}])), "theirs kept, the runner's added again"
    store.set_state("a", "CANCELLED", expect="QUEUED")
    d.tick()
    assert ray.gcs.client.constraint == [theirs], "the runner's bundles withdrawn, theirs left"
    assert ray.gcs.client.kv[b"autoscaler_resource_request"] == b"[]", "v1's copy: the runner's alone"
    writes = len(ray.gcs.calls)
    d.tick()
    assert len(ray.gcs.calls) == writes, "nothing of the runner's to ask for: nothing written"


def test_a_job_preempted_before_it_trains_is_requeued_by_a_server_restarted_meanwhile(world):
    store, ray, clock, add, d = world
    fixed_node(ray)
    add("spot", extra="  preemptible: true\n")
    assert d.tick() == ["spot"]
    store.db.execute("UPDATE jobs SET state = 'STARTING'")  # its driver has not said it runs yet
    ray.jobs["spot-1"] = "PENDING"
    ray.free_now[1] = Node("n1", 0, 0)
    ray.held["spot-1"] = {"n1": (1.0, 2.0)}
    add("urgent", priority=5)
    d.tick()
    assert ray.stopped == ["spot-1"]
    again = Dispatcher(store, ray, env={}, clock=clock)  # restarted before Ray said STOPPED: nothing in memory
    del ray.held["spot-1"]
    ray.free_now[1] = Node("n1", 1, 2)
    again.tick()
    spot = store.get("spot")
    assert spot.state == "QUEUED" and "stopped before it trained and queued again" in store.events("spot")[-1][
        "message"]
