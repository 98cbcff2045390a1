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


class FakeGcs:
    address = "gcs:6379"

    def __init__(self):
        self.requested = None
        self.calls: list[list[dict]] = []

    def request(self, bundles):
        self.calls.append(bundles)
        self.requested = bundles


class FakeElasticRay:
    """Ray's Jobs API and GCS as the dispatcher sees them: a head, and what the test says the autoscaler has."""

    def __init__(self):
        self.jobs: dict[str, str] = {}
        self.gcs = FakeGcs()
        self.nodes_now = [Node("head", 2, 0)]
        self.free_now = [Node("head", 2, 0)]
        self.types = [NodeType("gpu2", 1, 2, 2)]
        self.draining: set[str] = set()
        self.held: dict[str, dict[str, tuple[float, float]]] = {}  # submission -> node -> (cpus, gpus)
        self.stopped: list[str] = []

    def view(self):
        return ClusterView(self.nodes_now, self.free_now, self.types, set(self.draining))

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


def test_a_preempted_job_goes_back_to_the_queue_at_its_step_behind_the_job_it_gave_way_to(world):
    store, ray, clock, add, d = world
    ray.types = []  # a fixed cluster: one node of 2 GPUs
    ray.nodes_now.append(Node("n1", 1, 2))
    ray.free_now.append(Node("n1", 1, 2))
    spot_dir = add("spot", extra="  preemptible: true\n")
    assert d.tick() == ["spot"]
    ray.free_now[1] = Node("n1", 0, 0)
    ray.held["spot-1"] = {"n1": (1.0, 2.0)}
    add("urgent", priority=5)
    d.tick()
    assert read_control(spot_dir)["stop"] is True and d.waiting["urgent"][1] == (
        "waiting for preemptible job spot to checkpoint and stop")
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
    ray.types = []
    ray.nodes_now.append(Node("n1", 1, 2))
    ray.free_now.append(Node("n1", 1, 2))
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
    ray.types = []
    ray.nodes_now.append(Node("n1", 1, 2))
    ray.free_now.append(Node("n1", 1, 2))
    job_dir = add("a")
    (job_dir / CONTROL).write_text(json.dumps({"checkpoint": True, "stop": True, "why": "old", "attempt": 1}))
    (job_dir / PREEMPTED).write_text(json.dumps({"step": 3}))
    assert d.tick() == ["a"]
    assert not (job_dir / CONTROL).exists() and not (job_dir / PREEMPTED).exists()
    ray.jobs["a-1"] = "SUCCEEDED"
    d.tick()
    assert store.get("a").state == "SUCCEEDED"
