"""Elastic: the runner's queue on an autoscaling Ray cluster, jobs of mixed sizes submitted in bursts.

    python bench/elastic.py [--bursts 3] [--per-burst 3] [--gap 20] [--seed 0]

A real Ray head with the autoscaler (v2) and Ray's fake node provider, which starts worker nodes as local raylets
on demand: node type `gpu2` (1 CPU, 2 fake GPUs), at most 2 nodes, idle nodes removed after IDLE_S seconds. The
head holds no GPU, so every job needs a node the autoscaler adds. The real runner server as a process, with the GCS
(`--ray-gcs`) and the cluster config (RUNNER_CLUSTER_CONFIG). Jobs: a tiny BERT, 1 or 2 workers of 1 or 2 GPUs,
steps slowed so that they run for a while.

Figures (the last line, one JSON object):
  scale_up_start_s       median seconds from submit to RUNNING for jobs that had to wait for a node to be added
                         (RUNNING: the driver has read the data and the workers train; with the queue's wait)
  first_node_up_s        seconds from the first submit to the first worker node alive (the autoscaler's part)
  waste_ratio            node-seconds of worker nodes alive over the GPU-node-seconds the jobs ran (1.0: none
                         wasted; idle nodes up past their jobs, launches, the idle timeout count as waste)
  lost                   jobs with no terminal state at the end, or not SUCCEEDED
  requests_left          bundles left in the cluster's resource request once the queue is empty (autoscaler
                         state, v2's and v1's)
  nodes_left             worker nodes still up IDLE_S + 60 s after the queue emptied
  steps_lost_per_preemption   then one job's node drained (a spot reclaim) and removed 1.5 s later: the steps it
                         redid after resuming elsewhere (its workers checkpoint each step while the node drains)
  utilisation_fifo, utilisation_backfill
                         GPU utilisation (GPU-seconds used over GPU-seconds there were, first start to last end)
                         of the same job mix on runner.timeline's simulated clock (the dispatcher's own
                         runner.queue.decide), without and with backfill: the real cluster grows to fit either
                         way, so a fixed cluster of two 2-GPU nodes is where backfill shows

tests/integration/test_elastic.py uses `AutoscalingCluster`, `server()` and `recipe()` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ["RAY_AUTH_MODE"] = "disabled"  # a simulated cluster of this process's own

import chaos  # noqa: E402

NODE_TYPE = "gpu2"
FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's head node id (ray.autoscaler._private.fake_multi_node)
IDLE_S = 6  # idle_timeout_minutes 0.1


def config(gcs_port: int, max_nodes: int = 2) -> dict:
    """A cluster launcher config for Ray's fake multi-node provider: the head (2 CPUs, no GPU) and NODE_TYPE."""
    return {
        "cluster_name": "runner-elastic", "max_workers": max_nodes, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_S / 60,
        "provider": {"type": "external",  # the provider's own type wants an example file its wheel lacks
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{gcs_port}", "launch_multiple": True, "head_node_id": FAKE_HEAD_ID},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            NODE_TYPE: {"resources": {"CPU": 1, "GPU": 2, "object_store_memory": 100 * 2**20}, "node_config": {},
                        "min_workers": 0, "max_workers": max_nodes}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


class AutoscalingCluster:
    """A Ray head with the autoscaler v2 and the fake provider, started and stopped by this class alone: unlike
    ray.cluster_utils.AutoscalingCluster (whose start and shutdown run `ray stop --force`, stopping every Ray on the
    machine), it stops only the processes of its own GCS."""

    def __init__(self, work: Path, max_nodes: int = 2):
        from runner.local import free_port

        self.work = Path(work)
        self.port, self.dash = free_port(), free_port()
        self.config_path = self.work / "cluster.yaml"
        self.config_path.write_text(json.dumps(config(self.port, max_nodes)))  # JSON is YAML
        self.gcs = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"
        self.session: str | None = None

    def start(self) -> None:
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID, "RAY_USAGE_STATS_ENABLED": "0"}
        from runner.local import free_port

        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}",
                        f"--autoscaling-config={self.config_path}", "--num-cpus=2", "--num-gpus=0",
                        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
                        f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=true",
                        "--object-store-memory=200000000", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        # the session folder `ray start` just made: every node of this cluster logs there (see stop)
        self.session = os.path.realpath(Path(tempfile.gettempdir()) / "ray" / "session_latest")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                import httpx

                if httpx.get(f"{self.dashboard}/api/version", timeout=2).status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError("the autoscaling Ray head's dashboard did not answer in 60 s")

    def client(self):
        from ray._raylet import GcsClient

        return GcsClient(address=self.gcs)

    def state(self):
        from ray.core.generated.autoscaler_pb2 import GetClusterResourceStateReply

        reply = GetClusterResourceStateReply()
        reply.ParseFromString(self.client().get_cluster_resource_state())
        return reply.cluster_resource_state

    def workers(self) -> list[str]:
        """The ids of the worker nodes alive (RUNNING, IDLE or DRAINING)."""
        return [n.node_id.hex() for n in self.state().node_states
                if n.ray_node_type_name == NODE_TYPE and n.status in (1, 3, 4)]

    def request_left(self) -> tuple[int, int]:
        """Bundles in the cluster's resource request now: where autoscaler v2 reads it, and where v1 does."""
        v2 = sum(r.count for c in self.state().cluster_resource_constraints for r in c.resource_requests)
        v1 = json.loads(self.client().internal_kv_get(b"autoscaler_resource_request", None) or b"[]")
        return int(v2), len(v1)

    def drain(self, node_id: str, deadline_s: float = 60) -> None:
        """Drain a node as a spot reclaim does (reason: preemption, with a deadline)."""
        from ray.core.generated import autoscaler_pb2

        ok, why = self.client().drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(
            "DRAIN_NODE_REASON_PREEMPTION"), "bench: a spot reclaim", int((time.time() + deadline_s) * 1000))
        if not ok:
            raise RuntimeError(f"the drain was refused: {why}")

    def kill_node(self, node_id: str) -> int:
        """SIGKILL every process of a fake worker node (its raylet and workers carry the node's id in their
        environment), as a reclaimed VM goes. Returns how many."""
        return _kill(lambda p: f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}\0".encode() in _environ(p.pid))

    def autoscaler(self, run: bool) -> int:
        """Pause (SIGSTOP) or resume the autoscaler's monitor process: a slow cloud, for a test to look at what waits
        for a node. Returns how many processes it signalled."""
        port = str(self.port)
        return _kill(lambda p: any("autoscaler" in a and a.endswith("/monitor.py") for a in p.cmdline())
                     and any(a.endswith(f":{port}") for a in p.cmdline()), signal.SIGCONT if run else signal.SIGSTOP)

    def stop(self) -> None:
        """Every process of this cluster: those whose command line names its GCS port, those of its fake nodes (by
        the node ids in their environment), and its job drivers (RAY_ADDRESS names the GCS), which would otherwise
        wait for a GCS that is gone."""
        port = str(self.port)
        _kill(lambda p: any(a.endswith(f":{port}") or a.endswith(f"={port}") for a in p.cmdline())
              or f"RAY_ADDRESS=127.0.0.1:{port}".encode() in _environ(p.pid))
        # the nodes' agents, whose titles hide their command lines: by the logs they hold open in the session
        if self.session:
            _kill(lambda p: any(f.path.startswith(self.session + "/") for f in p.open_files()))


def _environ(pid: int) -> bytes:
    """A process's environment as /proc has it (psutil's reading is cut short where a process retitled itself)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _kill(match, sig=signal.SIGKILL) -> int:
    import psutil

    me, n = os.getpid(), 0
    for p in psutil.process_iter():
        try:
            if p.pid != me and p.uids().real == os.getuid() and match(p):
                p.send_signal(sig)
                n += 1
        except (psutil.Error, OSError):
            continue
    return n


def server(home: Path, c: AutoscalingCluster) -> chaos.Server:
    """The runner server as a process, reading the cluster through its GCS, the node types from its config."""
    home.mkdir(parents=True, exist_ok=True)
    return chaos.Server(home, c.dashboard, args=("--ray-gcs", c.gcs),
                        env={"RUNNER_CLUSTER_CONFIG": str(c.config_path)})


def recipe(model: Path, data: Path, name: str, steps: int = 6, workers: int = 1, gpus: int = 2, extra: str = "",
           resources: str = "", delay: float = 0.0) -> str:
    from tiny import faults

    return (f"name: {name}\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {data}\n"
            f"  max_seq_len: 16\ntrain:\n  max_steps: {steps}\n  batch_size: 8\n{extra}"
            + (faults(step_delay=delay) if delay else "")
            + f"resources:\n  workers: {workers}\n  cpus_per_worker: 1\n  gpus_per_worker: {gpus}\n{resources}"
            "export:\n  onnx: false\n")


MIX = (  # (name, workers, GPUs each, max_minutes, preemptible): as big as the cluster, a bounded one, a preemptible one
    ("big", 2, 2, 3.0, False),
    ("small", 1, 1, 2.0, False),
    ("spot", 1, 2, None, True),
)


def run(work: Path, bursts: int, per_burst: int, gap: float, seed: int, steps: int = 12, delay: float = 0.2,
        say=print) -> dict:
    from runner.queue import Need, Node
    from runner.timeline import SimJob, simulate
    from tiny import keyword_rows, tiny_model_dir, tiny_tokenizer

    rng = random.Random(seed)
    c = AutoscalingCluster(work)
    c.start()
    srv = server(work / "home", c)
    try:
        srv.start()
        model = tiny_model_dir(work / "bert", "bert", tiny_tokenizer(), weights=True)
        data = work / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(80)))
        submitted: dict[str, tuple[float, tuple]] = {}
        t0 = time.monotonic()
        clock = {"node_s": 0.0, "last": t0, "first_node": None}

        def count_nodes() -> int:  # worker node-seconds since the last count
            up, now = len(c.workers()), time.monotonic()
            clock["node_s"] += up * (now - clock["last"])
            clock["last"] = now
            if up and clock["first_node"] is None:
                clock["first_node"] = now - t0
            return up

        for burst in range(bursts):
            for i in range(per_burst):
                kind = MIX[(burst + i + rng.randint(0, 2)) % len(MIX)]
                lines = (f"  max_minutes: {kind[3]}\n" if kind[3] else "") + \
                    ("  preemptible: true\n" if kind[4] else "")
                code, job = srv.call("/jobs", {"recipe": recipe(model, data, kind[0], steps=steps, workers=kind[1],
                                                                gpus=kind[2], resources=lines, delay=delay)})
                assert code == 201, job
                submitted[job["id"]] = (time.monotonic(), kind)
            say(f"burst {burst + 1}: {per_burst} jobs submitted; worker nodes up: {len(c.workers())}")
            end = time.monotonic() + (gap if burst < bursts - 1 else 0)
            while time.monotonic() < end:
                count_nodes()
                time.sleep(1)
        ended = ("SUCCEEDED", "FAILED", "CANCELLED")
        while any(srv.job(j)["state"] not in ended for j in submitted) and time.monotonic() - t0 < 1800:
            count_nodes()
            time.sleep(1)
        emptied = time.monotonic()
        _wait(lambda: c.request_left() == (0, 0), 45)  # Ray Train's coordinator withdraws its own on a 20 s tick
        requests_left = sum(c.request_left())
        while count_nodes() and time.monotonic() - emptied < IDLE_S + 60:
            time.sleep(1)
        nodes_left = len(c.workers())
        node_seconds, first_node = clock["node_s"], clock["first_node"]
        waits, runs, jobs_node_s, sim = [], {}, 0.0, []
        for job_id, (at, kind) in submitted.items():
            job = srv.job(job_id)
            events = srv.call(f"/jobs/{job_id}/events")[1]["events"]
            started = [e["at"] for e in events if e["state_to"] == "RUNNING"]
            asked = any((e["message"] or "").startswith("asked the autoscaler") for e in events)
            if job["state"] == "SUCCEEDED" and started:
                ran = job["ended_at"] - started[0]
                runs[job_id] = ran
                jobs_node_s += ran * kind[1] * kind[2] / 2  # a gpu2 node holds 2 GPUs
                if asked:
                    waits.append(started[0] - job["created_at"])
                sim.append(SimJob(job_id, Need(kind[1], 1, kind[2]), at - t0, max(1.0, ran),
                                  bound_s=kind[3] and max(kind[3] * 60, ran), preemptible=kind[4]))
        lost = sum(1 for j in submitted if srv.job(j)["state"] != "SUCCEEDED")
        redone = preemption(c, srv, model, data, say)
        fixed = [Node("n1", 1, 2), Node("n2", 1, 2)]
        fifo, back = simulate(sim, fixed, backfill=False), simulate(sim, fixed, backfill=True)
    finally:
        srv.kill()
        c.stop()
    return {"jobs": len(submitted), "scale_up_start_s": round(statistics.median(waits), 1) if waits else None,
            "scale_up_waits": len(waits), "first_node_up_s": first_node and round(first_node, 1),
            "waste_ratio": round(node_seconds / jobs_node_s, 2) if jobs_node_s else None,
            "node_seconds": round(node_seconds), "job_node_seconds": round(jobs_node_s), "lost": lost,
            "requests_left": requests_left, "nodes_left": nodes_left, "steps_lost_per_preemption": redone,
            "utilisation_fifo": round(fifo.utilisation(4), 3), "utilisation_backfill": round(back.utilisation(4), 3)}


def preemption(c: AutoscalingCluster, srv, model: Path, data: Path, say=print) -> int | None:
    """A job's node drained as a spot reclaim does, then gone 1.5 s later: the steps its metrics.jsonl holds twice
    (redone after it resumed elsewhere). None where the job did not succeed."""
    code, job = srv.call("/jobs", {"recipe": recipe(model, data, "reclaimed", steps=24, delay=0.4,
                                                    resources="  max_failures: 2\n")})
    assert code == 201, job
    folder = Path(job["job_dir"])

    def steps():
        text = (folder / "metrics.jsonl").read_text() if (folder / "metrics.jsonl").exists() else ""
        return [r["step"] for r in map(json.loads, text.splitlines()) if r.get("split", "train") == "train"]

    _wait(lambda: len(steps()) >= 4, 240)
    node = next(n["id"] for n in srv.call("/cluster")[1]["nodes"] if any(h["job"] == job["id"] for h in n["held"]))
    c.drain(node)
    time.sleep(1.5)
    c.kill_node(node)
    say(f"drained and removed the node of {job['id']} at step {max(steps())}")
    _wait(lambda: srv.job(job["id"])["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), 300)
    if srv.job(job["id"])["state"] != "SUCCEEDED":
        return None
    written = steps()
    return len(written) - len(set(written))


def _wait(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--per-burst", type=int, default=3)
    ap.add_argument("--gap", type=float, default=20.0, help="Seconds between bursts.")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="elastic-") as d:
        out = run(Path(d), a.bursts, a.per_burst, a.gap, a.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
