"""Chaos: jobs on a simulated cluster while faults are injected on a seeded schedule, and what came of them.

    python bench/chaos.py [--jobs 8] [--faults 24] [--seed 0] [--every 6]

A Ray cluster of 3 worker nodes with a fake GPU each (`ray.cluster_utils.Cluster`, the head holds nothing), the
real runner server as a process, small jobs (a tiny BERT, 1 worker, `max_failures: 3`, a checkpoint every
CHECKPOINT_EVERY steps, steps slowed by STEP_DELAY s so that faults land while they train). Every `--every` seconds
one fault, drawn with the seed among those that apply at that moment:

  kill_worker   SIGKILL a Ray Train worker process: Ray Train restarts it from the last checkpoint
  remove_node   remove the node a job trains on (and add a fresh one): the same, on another node
  kill_server   SIGKILL the runner server, start it again 2-5 s later: it goes on from the store
  kill_driver   SIGKILL a job's driver: the job FAILS with a reason; it is retried from its checkpoint
  torn_line     append a line of NUL bytes to a job's metrics.jsonl (a torn write on NFS): skipped and said
  cancel        cancel a running job
  down_submit   SIGKILL the server, then `runner submit` a job: the CLI must say so in one line (exit 1) and
                lose nothing; the job is submitted again once the server is back

Then every job is waited for. Figures (the last line, one JSON object):
  lost                    jobs with no terminal state at the end, or missing from the server's list
  duplicated              Ray submissions that are not one attempt of the store's, more than one per attempt, or
                          a line of a job's events.jsonl copied into the store twice; a step twice in the store
  max_steps_lost          the most training steps redone after one recovery (worker, node or driver lost), read
                          from metrics.jsonl; against checkpoint_interval
  failed_without_reason   FAILED jobs whose reason is empty
Goal on 2 cores in about 15 minutes: >= 20 faults, 0 lost, 0 duplicated, max_steps_lost <= checkpoint_interval.
tests/integration/test_chaos.py runs a smaller fixed-seed version (`run(...)`) in the suite.
"""

from __future__ import annotations


import argparse
import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["RAY_AUTH_MODE"] = "disabled"  # a simulated cluster of this process's own

from jobs.jobdir import ACTIVE as ACTIVE_STATES, TERMINAL  # noqa: E402

CHECKPOINT_EVERY = 5
STEP_DELAY = 0.15
STEPS = 60
ENDED, ACTIVE = tuple(map(str, TERMINAL)), tuple(map(str, ACTIVE_STATES))
KINDS = ("kill_worker", "remove_node", "kill_server", "kill_driver", "torn_line", "cancel", "down_submit")


class Server:
    """`python -m runner.server` as a process of its own, so that it can be SIGKILLed."""

    def __init__(self, home: Path, dashboard: str, args: tuple[str, ...] = (), env: dict | None = None):
        """args, env: more of the server's options and environment (bench/elastic.py: the GCS, node types)."""
        self.home, self.dashboard, self.proc, self.port = home, dashboard, None, None
        self.args, self.extra_env = tuple(args), dict(env or {})

    def start(self) -> None:
        from runner.local import free_port

        self.port = self.port or free_port()
        env = {**os.environ, "RUNNER_HOME": str(self.home), "RUNNER_SHARED_STORAGE": "1", **self.extra_env}
        env.pop("RUNNER_TOKEN", None)
        log = open(self.home / "server.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "runner.server", "--port", str(self.port), "--ray",
                                      self.dashboard, "--interval", "0.5", *self.args], env=env, cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.get("/health") is not None:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start: {(self.home / 'server.log').read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str):
        import httpx

        try:
            r = httpx.get(self.url + path, timeout=30)
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    def post(self, path: str, body: dict):
        import httpx

        return httpx.post(self.url + path, json=body, timeout=60)

    def call(self, path: str, body: dict | None = None, quiet: bool = False) -> tuple[int, object]:
        """(status, JSON) of GET path, or of POST path with body; quiet: (0, None) when nothing answers."""
        import httpx

        try:
            r = httpx.request("POST" if body is not None else "GET", self.url + path, json=body, timeout=60)
        except httpx.TransportError:
            if quiet:
                return 0, None
            raise
        return r.status_code, r.json()

    def job(self, job_id: str) -> dict:
        return self.call(f"/jobs/{job_id}")[1]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def cluster(nodes: int = 3):
    import ray
    from ray.cluster_utils import Cluster

    from runner.local import free_port

    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        "object_store_memory": 150 * 2**20,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    workers = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 2**20) for _ in range(nodes)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    return c, workers, f"http://127.0.0.1:{port}"


def recipe(model: Path, data: Path, name: str) -> str:
    from tiny import faults as slow_steps

    return (f"name: {name}\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {data}\n"
            f"  max_seq_len: 16\ntrain:\n  max_steps: {STEPS}\n  batch_size: 8\n  eval_every: {CHECKPOINT_EVERY}\n"
            f"  checkpoint_every: {CHECKPOINT_EVERY}\n{slow_steps(step_delay=STEP_DELAY)}"
            "resources:\n  workers: 1\n  cpus_per_worker: 1\n"
            "  gpus_per_worker: 1\n  max_failures: 3\n")


def run(work: Path, c, workers: list, dashboard: str, jobs: int, faults: int, seed: int, every: float,
        kinds: tuple[str, ...] = KINDS, plan: tuple[str, ...] | None = None, say=print) -> dict:
    """The chaos run on a cluster made by `cluster()`; returns the figures. plan: the kinds in this order, each
    once (as soon as it applies), instead of drawn with the seed."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from tiny import keyword_rows, tiny_model_dir, tiny_tokenizer

    rng = random.Random(seed)
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    model = tiny_model_dir(work / "bert", "bert", tiny_tokenizer(), weights=True)
    data = work / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(120)))
    server = Server(home, dashboard)
    server.start()
    try:
        return _run(work, c, workers, dashboard, jobs, faults, seed, every, kinds, plan, say, rng, home, model, data,
                    server)
    finally:
        server.kill()  # whatever the ending: no server left running after the run


def _run(work, c, workers, dashboard, jobs, faults, seed, every, kinds, plan, say, rng, home, model, data, server):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    ids: list[str] = []
    injected: collections.Counter = collections.Counter()
    torn: collections.Counter = collections.Counter()
    retried: set[str] = set()
    notes: list[str] = []

    def submit(name: str) -> None:
        import httpx

        for _ in range(10):  # a server just restarted may not answer yet; an error answer is a finding
            try:
                r = server.post("/jobs", {"recipe": recipe(model, data, name)})
            except httpx.TransportError:
                time.sleep(1)
                continue
            if r.status_code == 201:
                ids.append(r.json()["id"])
                return
            notes.append(f"POST /jobs answered {r.status_code}: {r.text[:200]}")
            time.sleep(1)
        raise RuntimeError(f"job {name} could not be submitted: {notes[-1:]}")

    for i in range(jobs):
        submit(f"c{i}")

    def states() -> dict[str, dict]:
        got = server.get("/jobs?limit=500") or {"jobs": []}
        return {j["id"]: j for j in got["jobs"]}

    def running(st) -> list[dict]:
        return [j for j in st.values() if j["state"] == "RUNNING" and (j.get("progress") or {}).get("step")]

    def train_workers() -> list:
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
                if "Train" in a.class_name and a.class_name.endswith("Worker") and a.pid]

    def restart_server_later() -> None:
        time.sleep(rng.uniform(2, 5))
        server.start()

    def fault(kind: str, st: dict) -> str | None:
        """Inject one fault of `kind`; what was done, or None where it does not apply now."""
        run_now = running(st)
        # past a checkpoint: a recovery then goes on from one (before it, from the start: nothing to measure)
        checkpointed = [j for j in run_now if j["progress"]["step"] > CHECKPOINT_EVERY and j["id"] not in retried]
        if kind == "kill_worker":
            found = train_workers()
            if not found or not checkpointed:
                return None
            a = rng.choice(found)
            os.kill(a.pid, signal.SIGKILL)
            return f"killed Train worker pid {a.pid}"
        if kind == "remove_node":
            found = train_workers()
            alive = {n.node_id: n for n in workers}
            on = [alive[a.node_id] for a in found if a.node_id in alive]
            if not on:
                return None
            node = rng.choice(on)
            c.remove_node(node, allow_graceful=False)
            workers.remove(node)
            workers.append(c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 2**20))
            return f"removed node {node.node_id[:8]}, added a fresh one"
        if kind == "kill_server":
            server.kill()
            restart_server_later()
            return "killed the server, started it again"
        if kind == "kill_driver":
            if not checkpointed:
                return None
            job = rng.choice(checkpointed)
            pid_file = Path(job["job_dir"]) / "driver.pid"
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                return None
            retried.add(job["id"])
            return f"killed the driver of {job['id']}"
        if kind == "torn_line":
            if not run_now:
                return None
            job = rng.choice(run_now)
            with open(Path(job["job_dir"]) / "metrics.jsonl", "ab") as f:
                f.write(b"\0" * rng.randrange(8, 64) + b"\n")
            torn[job["id"]] += 1
            return f"a torn line in {job['id']}'s metrics.jsonl"
        if kind == "cancel":  # not one being recovered: its recovery is to be seen through
            others = [j for j in run_now if j["id"] not in retried]
            if not others:
                return None
            job = rng.choice(others)
            r = server.post(f"/jobs/{job['id']}/cancel", {})
            return f"cancelled {job['id']} ({r.status_code})"
        if kind == "down_submit":
            server.kill()
            path = work / "down.yaml"
            path.write_text(recipe(model, data, f"down{len(ids)}"))
            out = subprocess.run([str(Path(sys.executable).parent / "runner"), "submit", "--detach", str(path)],
                                 capture_output=True, text=True, env={**os.environ, "RUNNER_SERVER": server.url},
                                 timeout=120)
            said = out.stderr.strip()
            if out.returncode != 1 or "cannot reach the runner server" not in said or "Traceback" in said:
                notes.append(f"down_submit: exit {out.returncode}: {said[-300:]}")
            restart_server_later()
            if len(states()) != len(ids):
                notes.append("down_submit: a job appeared that the CLI was told failed")
            submit(f"down{len(ids)}")
            return "submitted while the server was down: refused in one line; submitted again"
        raise ValueError(kind)

    t0 = time.monotonic()
    deadline = t0 + 60 * 30
    faults = len(plan) if plan else faults
    while sum(injected.values()) < faults and time.monotonic() < deadline:
        time.sleep(every)
        if not server.up:
            server.start()
        st = states()
        n = sum(injected.values())
        for kind in ([plan[n]] if plan else rng.sample(kinds, len(kinds))):
            done = fault(kind, st)
            if done:
                injected[kind] += 1
                say(f"{time.monotonic() - t0:6.0f} s  fault {sum(injected.values())}: {kind}: {done}")
                break
        for j in states().values():  # a job whose driver was killed goes on from its checkpoint
            if j["id"] in retried and j["state"] == "FAILED" and j["attempt"] < 4:
                server.post(f"/jobs/{j['id']}/retry", {"from_checkpoint": True})
        if all(j["state"] in ENDED for j in states().values()) and sum(injected.values()) < faults:
            submit(f"more{len(ids)}")  # keep something running to inject into

    end_by = time.monotonic() + 60 * 10
    while time.monotonic() < end_by:  # no more faults: every job ends
        if not server.up:
            server.start()
        st = states()
        for j in st.values():
            if j["id"] in retried and j["state"] == "FAILED" and j["attempt"] < 4:
                server.post(f"/jobs/{j['id']}/retry", {"from_checkpoint": True})
        if len(st) == len(ids) and all(j["state"] in ENDED for j in st.values()) and \
                not any(j["id"] in retried and j["state"] == "FAILED" and j["attempt"] < 4 for j in st.values()):
            break
        time.sleep(2)
    st = states()
    server.kill()
    return figures(home, ids, st, injected, torn, JobSubmissionClient(dashboard), notes, time.monotonic() - t0)


def figures(home: Path, ids: list[str], st: dict, injected, torn, ray_jobs, notes: list[str], seconds: float) -> dict:
    db = sqlite3.connect(home / "runner.db")
    lost = [i for i in ids if i not in st or st[i]["state"] not in ENDED]
    duplicated: list[str] = []
    attempts = {j: {r[0] for r in db.execute("SELECT attempt FROM attempts WHERE job_id = ?", (j,))} for j in ids}
    seen = collections.Counter()
    for info in ray_jobs.list_jobs():
        sid = info.submission_id or ""
        job, _, n = sid.rpartition("-")
        if job in attempts:
            seen[sid] += 1
            if not n.isdigit() or int(n) not in attempts[job]:
                duplicated.append(f"Ray submission {sid} is no attempt of the store's")
    duplicated += [f"Ray has {sid} {k} times" for sid, k in seen.items() if k > 1]
    for job_id, attempt, split, step, k in db.execute(
            "SELECT job_id, attempt, split, step, COUNT(*) FROM metrics GROUP BY 1, 2, 3, 4 HAVING COUNT(*) > 1"):
        duplicated.append(f"{job_id} attempt {attempt} step {step} ({split}) {k} times in the store")
    max_lost, recoveries = 0, 0
    for j in ids:
        folder = home / "artifacts" / j
        lines = (folder / "events.jsonl").read_text(errors="replace").splitlines() \
            if (folder / "events.jsonl").exists() else []
        said = collections.Counter(json.loads(x).get("message") for x in lines if x.strip())
        stored = collections.Counter(r[0] for r in db.execute("SELECT message FROM events WHERE job_id = ?", (j,)))
        for message, k in said.items():
            if message and stored[message] > k:
                duplicated.append(f"{j}: '{message[:60]}' copied {stored[message]} times, written {k}")
        steps = []
        for x in (folder / "metrics.jsonl").read_text(errors="replace").splitlines() \
                if (folder / "metrics.jsonl").exists() else []:
            try:
                rec = json.loads(x)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("split", "train") == "train" and isinstance(rec.get("step"), int):
                steps.append(rec["step"])
        for a, b in zip(steps, steps[1:]):
            if b <= a:  # a restart: the steps after the checkpoint it went on from are done again
                recoveries += 1
                max_lost = max(max_lost, a - b + 1)
    ended = collections.Counter(st[i]["state"] if i in st else "MISSING" for i in ids)
    no_reason = [i for i in ids if i in st and st[i]["state"] == "FAILED" and not (st[i].get("reason") or "").strip()]
    reasons = sorted({(st[i].get("reason") or "")[:120] for i in ids if i in st and st[i]["state"] == "FAILED"})
    return {"faults": sum(injected.values()), "faults_by_kind": dict(sorted(injected.items())), "jobs": len(ids),
            "ended_by_state": dict(sorted(ended.items())), "lost": len(lost), "duplicated": len(duplicated),
            "max_steps_lost": max_lost, "recoveries": recoveries, "checkpoint_interval": CHECKPOINT_EVERY,
            "failed_without_reason": len(no_reason), "torn_lines": sum(torn.values()),
            "seconds": round(seconds), "details": {"lost": lost, "duplicated": duplicated[:10],
                                                   "failed_reasons": reasons, "notes": notes}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--faults", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=float, default=6.0, help="Seconds between faults.")
    a = ap.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="runner-chaos-"))
    c, workers, dashboard = cluster()
    try:
        out = run(work, c, workers, dashboard, a.jobs, a.faults, a.seed, a.every)
    finally:
        ray.shutdown()
        c.shutdown()
    print(f"{out['faults']} faults in {out['seconds']} s: " + ", ".join(f"{k} {v}" for k, v in
                                                                     out["faults_by_kind"].items()))
    print(f"{out['jobs']} jobs: " + ", ".join(f"{k} {v}" for k, v in out["ended_by_state"].items())
          + f"; lost {out['lost']}, duplicated {out['duplicated']}, failed without a reason "
          f"{out['failed_without_reason']}")
    print(f"{out['recoveries']} recoveries; most steps redone after one: {out['max_steps_lost']} "
          f"(checkpoint every {out['checkpoint_interval']})")
    for line in out["details"]["failed_reasons"] + out["details"]["duplicated"] + out["details"]["notes"]:
        print("  " + line)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
