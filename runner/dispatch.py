"""Dispatch: queued jobs onto Ray through the Ray Jobs API, and what happens to them back into the store.

`Dispatcher.tick()` is one pass; the server runs it every second. A pass
1. follows every job it has started: Ray's job status moves the store's state (STARTING -> RUNNING -> SUCCEEDED,
   or FAILED with the driver's reason from failure.txt); new lines of the job's metrics.jsonl and events.jsonl
   (RETRYING when Ray Train restarts lost workers, RUNNING when they are back, EXPORTING) are copied into the
   store. The server pulls: the job folder is on storage both can read, and the driver needs no way back to the
   server. How far each file was copied is kept per attempt in the store, so a restarted server goes on where the
   last one stopped;
2. asks `runner.queue.decide` which queued jobs fit what the cluster has free, claims each (QUEUED -> STARTING,
   compare-and-set) and submits it with submission id `<job id>-<attempt>`. Ray refuses a submission id it
   already has, so a job claimed by a server that died before its submission is recorded is submitted again
   safely: never twice.

A job whose Ray submission has gone (the cluster was restarted), or whose cluster cannot be reached for
LOST_AFTER seconds, is marked FAILED with that reason: never left RUNNING.

What is free is what Ray's GCS says each node has available (other users' actors and tasks count), where the
backend reads the GCS (runner.elastic); else the cluster's total (Ray's node list) less what the runner's own
running jobs hold, the runner taken to be the cluster's only user. With the GCS, a pass also sets the autoscaler's
resource request for the jobs that wait for a node, asks the workers of a job on a node being drained to checkpoint
at every step, and stops (at a checkpoint, then queues again) the preemptible jobs in the way of the queue's head.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

from dataclasses import dataclass

from jobs.jobdir import (ACTIVE, CONTROL, PREEMPTED, TERMINAL, TRAINING, TRIAL, TRIALS, JobState, can_move,
                         checkpoints_newest_first, clear_control, first_line, read_at, read_control, read_preempted,
                         whole_lines, write_control)
from runner.jobfiles import export_note, read_json, read_text
from runner.queue import FIRST_FIT, Need, Node, Queued, Running, decide, place, refusal, taken
from runner.store import InvalidTransition, Job, Store, StoreError

LOST_AFTER = 30.0
TRIAL_NAME = re.compile(r"t[0-9]{3,4}")  # a sweep's trial folder (jobs.sweep.trial_dir)
MAX_TRIALS = 1000  # as jobs.schema's sweep.trials
WORKER_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_MODE",
              "RUNNER_VERBOSE", "RUNNER_SHARED_STORAGE", "RUNNER_CALLBACKS")
# Ray's own token is not among them: the drivers inherit it from the Ray head they run on, and env_vars of a job are
# shown by Ray's API and dashboard.


PREEMPT_LEAD_S = 60.0  # preemptible jobs in the head's way are stopped this long before it could start
PREEMPT_GRACE_S = 300.0  # a preempted job not stopped at a checkpoint by then is stopped through Ray
GCS_GRACE_S = 60.0  # a GCS with no answer for this long: plan from Ray's node list (the runner as the only user)
VIEW_MAX_AGE_S = 10.0  # the API shows a pass's view of the GCS for this long


def need_of(job: Job) -> Need:
    return Need(job.workers, job.cpus, job.gpus)


@dataclass(frozen=True)
class Terms:
    """What a job's recipe says about its time and its place in the queue."""

    max_minutes: float | None = None
    preemptible: bool = False
    max_steps: int | None = None


def terms_of(snapshot: str) -> Terms:
    """Terms from a recipe snapshot (the server wrote it from a checked recipe; anything odd reads as no term)."""
    import yaml

    try:
        doc = yaml.safe_load(snapshot[:1_000_000]) if isinstance(snapshot, str) else None
    except yaml.YAMLError:
        return Terms()
    if not isinstance(doc, dict):
        return Terms()
    res = doc.get("resources") if isinstance(doc.get("resources"), dict) else {}
    train = doc.get("train") if isinstance(doc.get("train"), dict) else {}
    minutes, steps = res.get("max_minutes"), train.get("max_steps")
    ok = isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and 0 < minutes <= 525_600  # as schema
    return Terms(float(minutes) if ok else None, res.get("preemptible") is True,
                 steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None)


class RayUnreachable(Exception):
    """The Ray cluster's dashboard does not answer; the message says where and why."""


class UnknownSubmission(Exception):
    """Ray has no job with this submission id (its Jobs API answered 404)."""


class RayRefused(Exception):
    """Ray's Jobs API answered with another 4xx: it is up, and said no (a submission id it already has...)."""


_RAY_STATUS = re.compile(r"Request failed with status code (\d{3}):")


def ray_status(e: BaseException) -> int | None:
    """The HTTP status of Ray's answer where the Jobs client raised for one (it raises RuntimeError("Request failed
    with status code N: ...")); None for anything else (a connection error, whose text holds the URL and so the
    job's id and its digits)."""
    if type(e) is not RuntimeError:
        return None
    m = _RAY_STATUS.match(str(e))
    return int(m.group(1)) if m else None


def apply_node_summary(nodes: dict[str, dict], summary: list[dict]) -> None:
    """Fill host, IP, head, physical memory and GPU model and memory (the smallest of the node's GPUs, as the
    dashboard's reporter reads them with NVML) into `nodes` (by node id) from Ray's `/nodes?view=summary`."""
    for s in summary:
        node = nodes.get((s.get("raylet") or {}).get("nodeId"))
        if node is None:
            continue
        total, _avail, _pct, used = (s.get("mem") or [None] * 4)[:4]
        node.update(host=s.get("hostname"), ip=s.get("ip"), head=bool(s["raylet"].get("isHeadNode")),
                    mem_total=total, mem_used=used)
        gpus = [g for g in s.get("gpus") or [] if g.get("memoryTotal")]
        if gpus:
            small = min(gpus, key=lambda g: g["memoryTotal"])
            node.update(gpu_name=small.get("name"), gpu_memory_bytes=int(small["memoryTotal"]) * 2**20)  # MiB


class RayJobs:
    """The Ray Jobs API and Ray's node list, at a dashboard address, with Ray's token when auth is on."""

    def __init__(self, address: str, token: str | None = None, nodes_max_age: float = 3.0, gcs: str | None = None,
                 cluster_config: str | None = None):
        """gcs: the GCS's address (host:port): with it, what is free comes from Ray's own view, node types from the
        autoscaler, and the runner asks the autoscaler for nodes (runner.elastic). cluster_config: the cluster's
        config file, where the autoscaler does not report its node types to the GCS."""
        # imported here, in the one thread that makes the backend: imported first by two threads at once (the
        # dispatch loop and a request, just after a start) Ray's modules fail half-initialized (seen in chaos runs)
        import ray.job_submission  # noqa: F401
        import ray.util.state  # noqa: F401

        self.address = address.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = None
        self.nodes_max_age = nodes_max_age  # the node list changes rarely; asking for it each pass slows dispatch
        self._nodes: tuple[float, list[Node]] | None = None
        self._details: tuple[float, dict] | None = None
        if gcs:
            from runner.elastic import Gcs

            self.gcs = Gcs(gcs, cluster_config)
        else:
            self.gcs = None

    def view(self):
        """runner.elastic.ClusterView: the nodes, what each has free, node types, draining nodes, the request."""
        return self.gcs.view()

    @property
    def client(self):
        """Made on first use (it asks the dashboard for its version), made again after the cluster went away."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address, headers=self.headers)
            except Exception as e:  # noqa: BLE001 - ConnectionError, or Ray's RuntimeError around it
                raise RayUnreachable(f"the Ray cluster at {self.address} does not answer ({first_line(e)})") \
                    from None
        return self._client

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted by Ray's HTTP status, never by words in a message
            code = ray_status(e)
            if code == 404:
                raise UnknownSubmission(first_line(e)) from None
            if code is not None and 400 <= code < 500:
                raise RayRefused(str(e)[:2000]) from None
            self._client = None
            raise RayUnreachable(f"the Ray cluster at {self.address} does not answer ({first_line(e)})") from None

    def nodes(self) -> list[Node]:
        """The ALIVE nodes with their CPUs and GPUs, at most `nodes_max_age` seconds old."""
        from ray.util.state import list_nodes

        if self._nodes and time.monotonic() - self._nodes[0] < self.nodes_max_age:
            return self._nodes[1]
        try:
            found = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001
            raise RayUnreachable(f"the Ray cluster at {self.address} does not answer ({first_line(e)})") from None
        out = []
        for n in found:
            res = n.resources_total or {}
            out.append(Node(n.node_id, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                            float(res.get("memory", 0))))
        self._nodes = (time.monotonic(), out)
        return out

    def details(self) -> dict:
        """The dashboard's view of the cluster, at most `nodes_max_age` seconds old: each ALIVE node with its host,
        its resources (CPUs, GPUs, Ray's schedulable memory), its physical memory (Ray's node summary, where the
        dashboard gives it), and what each Ray job's placement groups hold on it, by submission id."""
        from ray.util.state import list_placement_groups

        if self._details and time.monotonic() - self._details[0] < self.nodes_max_age:
            return self._details[1]
        nodes = {n.id: {"id": n.id, "cpus": n.cpus, "gpus": n.gpus, "memory_bytes": n.memory, "host": None,
                        "ip": None, "head": False, "mem_total": None, "mem_used": None, "gpu_name": None,
                        "gpu_memory_bytes": None, "held": []}
                 for n in self.nodes()}
        try:
            import httpx

            r = httpx.get(f"{self.address}/nodes", params={"view": "summary"}, headers=self.headers, timeout=5)
            apply_node_summary(nodes, r.json()["data"]["summary"])
        except Exception:  # noqa: BLE001 - the physical figures are extras; the resources above still stand
            pass
        try:
            owners = {j.job_id: j.submission_id for j in self._call(self.client.list_jobs) if j.job_id}
            groups = list_placement_groups(address=self.address, filters=[("state", "=", "CREATED")], detail=True,
                                           raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001
            raise RayUnreachable(f"the Ray cluster at {self.address} does not answer ({first_line(e)})") from None
        for g in groups:
            held: dict[str, dict[str, float]] = {}
            for b in g.bundles or []:
                res = held.setdefault(b.get("node_id"), {"cpus": 0.0, "gpus": 0.0})
                res["cpus"] += float((b.get("unit_resources") or {}).get("CPU", 0))
                res["gpus"] += float((b.get("unit_resources") or {}).get("GPU", 0))
            for node_id, res in held.items():
                if node_id in nodes:
                    nodes[node_id]["held"].append({"submission": owners.get(g.creator_job_id), **res})
        out = {"nodes": list(nodes.values())}
        self._details = (time.monotonic(), out)
        return out

    def submit(self, submission_id: str, job_dir: str, env: dict[str, str], fresh: bool = False) -> None:
        self._call(self.client.submit_job,
                   entrypoint=shlex.join([sys.executable, "-m", "jobs.entrypoint", job_dir] + (["--fresh"] if fresh
                                                                                               else [])),
                   submission_id=submission_id, runtime_env={"env_vars": {**env, "RUNNER_LOG_TO_FILE": "1"}},
                   metadata={"runner_job_dir": job_dir})

    def status(self, submission_id: str) -> tuple[str, str]:
        info = self._call(self.client.get_job_info, submission_id)
        return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""

    def stop(self, submission_id: str) -> None:
        self._call(self.client.stop_job, submission_id)


class Dispatcher:
    def __init__(self, store: Store, backend, env: dict[str, str] | None = None, clock=time.monotonic,
                 on_success=None, on_start=None, on_end=None):
        """on_success(job): called once a job is recorded SUCCEEDED (the model registry takes its version).
        on_start(job): called before each submission of a job to Ray (the registry leaves the champion to meet).
        on_end(job): called once a job it followed has ended, whatever the ending (checkpoint retention)."""
        self.store, self.backend, self.clock, self.on_success = store, backend, clock, on_success
        self.on_start, self.on_end = on_start, on_end
        base = os.environ if env is None else env
        self.env = {k: base[k] for k in WORKER_ENV if k in base}
        self.unreachable_since: float | None = None
        self.waiting: dict[str, tuple[int, str]] = {}  # queued job id -> (position, why it waits), as of the last pass
        self.failing: dict[str, str] = {}  # job id -> why its follow-up failed, said once until it changes
        self.backfill = os.environ.get("RUNNER_BACKFILL", "1") != "0"  # 0: strict first in, first out
        self.lead_s = PREEMPT_LEAD_S
        self.requested_for: dict[str, list[str]] = {}  # queued job id -> node types asked for it, as of the last pass
        # what the server asked of a job's current attempt, by job id: (attempt, ...) so that an entry left by an
        # earlier attempt is never taken for the current one's
        self.preempting: dict[str, tuple] = {}  # (attempt, why, since, stopped through Ray): being preempted
        self.draining_for: dict[str, tuple] = {}  # (attempt, nodes): asked to checkpoint while nodes drain
        self.overtime: dict[str, tuple] = {}  # (attempt, why): stopped for running past resources.max_minutes
        self.trouble: dict[str, str] = {}  # what of a pass failed, and why, said once
        self._last_view: tuple[float, object] | None = None  # (when, the GCS's view) as of the last pass
        self._gcs_failing_since: float | None = None
        self._terms: dict[str, Terms] = {}
        self._bounds: dict[str, tuple[float, tuple]] = {}
        self._asked: dict[str, list[str]] = {}

    @staticmethod
    def submission(job: Job) -> str:
        return f"{job.id}-{job.attempt}"

    def refusal(self, need: Need) -> str | None:
        view = self.view() or self._peek()  # read now where no pass has yet: the node types decide a refusal
        return refusal(need, view.nodes if view else self.backend.nodes(), view.types if view else ())

    def view(self):
        """The cluster as Ray's GCS said it was at the last pass (free capacity by node, node types, draining nodes,
        the resource request), or None where the backend reads only Ray's node list or the GCS gave no view lately:
        what the API shows and refuses by, read without waiting on the GCS in a request."""
        if self._last_view is None or self.clock() - self._last_view[0] > VIEW_MAX_AGE_S:
            return None
        return self._last_view[1]

    def free(self, nodes: list[Node]) -> list[Node]:
        """What the runner's own jobs leave of `nodes`' totals (where Ray's own view of what is free is not read)."""
        return self._held_by_plan(self.active(), nodes)[1]

    def active(self) -> list[Job]:
        return [j for state in ACTIVE for j in self.store.list(state=state, limit=100_000)]

    def tick(self) -> list[str]:
        """One pass; returns the ids of the jobs started in it."""
        try:
            for job in self.active():
                self._follow_one(job)
            view = self._view()
            if view is None and self._gcs_failing():  # for a while: what is free is not known, nothing starts
                return []
            nodes = view.nodes if view else self.backend.nodes()
        except RayUnreachable as e:
            self._lost(str(e))
            return []
        self.unreachable_since = None
        active = self.active()
        queue = self.store.queue()
        if view:
            # who holds what (Ray's placement groups: a slower read) matters only with something to place or a node
            # being drained; a pass with neither still withdraws the request and checks the bounds
            held = self._held_by_ray(active) if queue or view.draining else {}
            if held is None:  # who holds what is not known this pass: start nothing rather than guess
                return []
            own: dict[str, tuple[float, float]] = {}
            for h in held.values():
                for node, (c, g) in h.items():
                    own[node] = (own.get(node, (0.0, 0.0))[0] + c, own.get(node, (0.0, 0.0))[1] + g)
            others = [Node(t.id, max(0.0, t.cpus - f.cpus - own.get(t.id, (0, 0))[0]),
                           max(0.0, t.gpus - f.gpus - own.get(t.id, (0, 0))[1])) for t, f in zip(nodes, view.free)]
            free = view.free
            for job in active:  # submitted, no placement group yet: what it will take is not in Ray's figure
                if job.id not in held and job.state != JobState.EXPORTING:
                    after = place(need_of(job), free)
                    if after is not None:
                        held[job.id] = taken(free, after)
                        free = after
            self._guard("the drained nodes' jobs", self._drained, active, held, view.draining)
        else:
            (held, free), others = self._held_by_plan(active, nodes), []
        self._guard("the jobs past their bounds", self._overtime, active)
        self._guard("the preemptions not acted on", self._preempt_deadline, active)
        now = self.store.clock()
        # a job being preempted is ending: its resources come back now, and it is not preempted twice
        running = [Running(j.id, held.get(j.id, {}), 0.0 if self._mine(self.preempting, j) else
                           self._ends_in(j, now), self._yields(j, now), self._key(j))
                   for j in sorted(active, key=lambda j: -(j.started_at or 0))]
        decision = decide([self._queued(j) for j in queue], free, types=view.types if view else (), others=others,
                          running=running, backfill=self.backfill, lead_s=self.lead_s)
        self.waiting = decision.waiting
        for job_id, why in decision.preempt.items():
            self._guard(f"the preemption of {job_id}", self._preempt, job_id, why)
        if view is not None:
            self._guard("the autoscaler's resource request", self._request, decision, queue, nodes, view)
        started = []
        for job_id in decision.start:
            job = self.store.get(job_id)
            try:
                job = self.store.set_state(job_id, JobState.STARTING, expect=JobState.QUEUED, offsets=self._sizes(job))
            except InvalidTransition:  # another dispatcher took it, or it was cancelled meanwhile
                continue
            if decision.rules[job_id] != FIRST_FIT:
                self.store.note(job_id, f"started: {decision.rules[job_id]}")
            if self._submit(job):
                started.append(job_id)
        return started

    def _guard(self, what: str, fn, *args) -> None:
        """fn(*args), where its failure is said once in the server's log (until it changes) and stops nothing else
        of the pass: an elastic refinement never keeps jobs that fit from starting."""
        try:
            fn(*args)
            self.trouble.pop(what, None)
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {first_line(e)}"
            if self.trouble.get(what) != why:
                self.trouble[what] = why
                print(f"runner: {what} failed this pass ({why}); tried again each pass", file=sys.stderr, flush=True)

    def _view(self):
        """The GCS's view, or None (the runner then plans as the cluster's only user, from Ray's node list) where
        the backend has no GCS or the GCS does not answer as it should: said once, never a reason to fail jobs."""
        if getattr(self.backend, "gcs", None) is None:
            return None
        try:
            view = self.backend.view()
        except Exception as e:  # noqa: BLE001 - the GCS, its answer, or the cluster config file
            why = f"{type(e).__name__}: {first_line(e)}"
            if self.trouble.get("gcs") != why:
                self.trouble["gcs"] = why
                print(f"runner: the Ray GCS at {self.backend.gcs.address} gave no view of the cluster ({why}); "
                      f"nothing starts for {GCS_GRACE_S:.0f} s, then the runner plans from Ray's node list as the "
                      "cluster's only user until it answers", file=sys.stderr, flush=True)
            if self._gcs_failing_since is None:
                self._gcs_failing_since = self.clock()
            return None
        self.trouble.pop("gcs", None)
        self._gcs_failing_since = None
        bad = getattr(self.backend.gcs, "config_error", None)
        if bad and self.trouble.get("config") != bad:
            print(f"runner: {bad}; the node types read from it last stand", file=sys.stderr, flush=True)
        self.trouble["config"] = bad
        self._last_view = (self.clock(), view)
        return view

    def _peek(self):
        """The GCS's view read for a request (the dispatch loop's own record of it untouched), or None."""
        if getattr(self.backend, "gcs", None) is None:
            return None
        try:
            return self.backend.view()
        except Exception:  # noqa: BLE001 - as for the loop: no view
            return None

    def _gcs_failing(self) -> bool:
        """The GCS gave no view at this pass, and has not for less than GCS_GRACE_S: a blip, waited out."""
        since = self._gcs_failing_since
        return since is not None and self.clock() - since < GCS_GRACE_S

    # --- the queue's view of a job ----------------------------------------------------------------------------------

    def terms(self, job: Job) -> Terms:
        """What the job's recipe says about its time and its place (read once per job: the snapshot never changes)."""
        t = self._terms.get(job.id)
        if t is None:
            t = self._terms[job.id] = terms_of(job.recipe)
        return t

    def _key(self, job: Job) -> tuple:
        return (-job.priority, job.created_at, job.id)

    def bound(self, job: Job) -> tuple[float | None, str]:
        """The most seconds the job runs once started, and where that comes from: resources.max_minutes, else earlier
        runs of the same recipe (its name; run in one attempt, on the same workers and GPUs) with train.max_steps:
        the longest wall time of the last ones, scaled to this job's steps, plus a quarter."""
        t = self.terms(job)
        if t.max_minutes is not None:
            return t.max_minutes * 60, f"resources.max_minutes {t.max_minutes:g}"
        if t.max_steps is None or job.kind == "sweep":  # a sweep's time is its trials', not its name's history
            return None, ""
        cached = self._bounds.get(job.id)
        if cached is not None and self.clock() - cached[0] < 60:
            return cached[1]
        worst = None
        for prior in self.store.list(state=JobState.SUCCEEDED, name=job.name, limit=5):
            steps = (json.loads(prior.progress) if prior.progress else {}).get("total_steps")
            if prior.id == job.id or not prior.started_at or not prior.ended_at or not isinstance(steps, int) \
                    or steps <= 0 or prior.attempt != 1 or (prior.workers, prior.gpus) != (job.workers, job.gpus):
                continue  # a run resumed (its last attempt's time is not the run's) or on other resources
            wall = (prior.ended_at - prior.started_at) * max(1.0, t.max_steps / steps)
            worst = wall if worst is None else max(worst, wall)
        out = (None, "") if worst is None else (1.25 * worst, f"earlier runs of {job.name} scaled to "
                                                             f"{t.max_steps} steps, plus a quarter")
        self._bounds[job.id] = (self.clock(), out)
        return out

    def _queued(self, job: Job) -> Queued:
        bound, source = self.bound(job)
        return Queued(job.id, need_of(job), bound, source, self.terms(job).preemptible, self._key(job))

    def _ends_in(self, job: Job, now: float) -> float | None:
        bound, _ = self.bound(job)
        return None if bound is None or not job.started_at else max(0.0, job.started_at + bound - now)

    def _held_by_ray(self, active: list[Job]) -> dict[str, dict[str, tuple[float, float]]] | None:
        """What each active job holds on each node, by its placement groups as Ray lists them; None where Ray's
        list cannot be read."""
        try:
            by_submission: dict[str, dict[str, tuple[float, float]]] = {}
            for n in self.backend.details()["nodes"]:
                for h in n["held"]:
                    per = by_submission.setdefault(h["submission"], {})
                    c, g = per.get(n["id"], (0.0, 0.0))
                    per[n["id"]] = (c + float(h["cpus"]), g + float(h["gpus"]))
        except Exception:  # noqa: BLE001 - Ray's answer, whatever its trouble
            return None
        return {j.id: by_submission[self.submission(j)] for j in active if self.submission(j) in by_submission}

    def _held_by_plan(self, active: list[Job], nodes: list[Node]) -> tuple[dict, list[Node]]:
        """Each active job's need placed on the nodes' totals, as the queue would, and what that leaves free (no
        GCS: the runner is taken to be the cluster's only user)."""
        out, left = {}, nodes
        for job in active:
            after = place(need_of(job), left)
            if after is not None:
                out[job.id], left = taken(left, after), after
        return out, left

    def _yields(self, job: Job, now: float) -> bool:
        """Whether the job may be preempted for a job ahead of it: it says so (resources.preemptible), or it ran
        past a bound measured on earlier runs (which the runner cannot enforce as it does max_minutes: such a job
        gives way at a checkpoint instead). Not while it exports (its training is over) or is already stopping."""
        if job.state == JobState.EXPORTING or self._mine(self.preempting, job) or job.kind == "sweep":
            return False  # a sweep stops and resumes as one (its trials hear no stop request of the server)
        if self.terms(job).preemptible:
            return True
        bound, source = self.bound(job)
        return bool(source.startswith("earlier runs") and job.started_at and now - job.started_at > bound)

    @staticmethod
    def _mine(entries: dict, job: Job):
        """The entry kept for this attempt of the job, or None (one of an earlier attempt is dropped)."""
        entry = entries.get(job.id)
        if entry is not None and entry[0] != job.attempt:
            del entries[job.id]
            return None
        return entry

    # --- elastic: the autoscaler's request, preemption, drained nodes, time limits ---------------------------------

    def _request(self, decision, queue: list[Job], nodes: list[Node], view) -> None:
        """The cluster's resource request: the bundles in use now plus those of each job waiting for a node to be
        added; withdrawn when no job waits for one; what others asked for kept beside it (runner.elastic.Gcs.ensure).
        Written again when someone else's write took it out."""
        bundles: list[dict] = []
        if decision.requests:
            for t, f in zip(nodes, view.free):
                used = {"CPU": round(t.cpus - f.cpus, 4), "GPU": round(t.gpus - f.gpus, 4)}
                if any(v > 0 for v in used.values()):
                    bundles.append({k: v for k, v in used.items() if v > 0})
            for job in queue:
                if job.id in decision.requests:
                    need = need_of(job)
                    bundles += [{k: v for k, v in (("CPU", need.cpus), ("GPU", need.gpus)) if v}] * need.workers
        self.requested_for = dict(decision.requests)
        if not self.backend.gcs.ensure(bundles, view.request):
            return
        view.request = [{"resources": b, "count": 1} for b in self.backend.gcs.written]  # as the API shows it
        for job_id, kinds in decision.requests.items():
            if self._asked.get(job_id) != kinds:
                self._asked[job_id] = kinds
                self.store.note(job_id, f"asked the autoscaler for {', '.join(kinds)} (the cluster's resource request: "
                                        f"{len(bundles)} bundles, the ones in use included)")

    def release(self) -> None:
        """Withdraw the runner's resource request (the server stops: nothing of it keeps nodes up)."""
        gcs = getattr(self.backend, "gcs", None)
        if gcs is not None and gcs.requested:
            gcs.ensure([], self.backend.view().request)  # the server stops: worth a read of the GCS

    @staticmethod
    def control(job: Job, checkpoint: bool, stop: bool, why: str) -> None:
        """Ask the job's workers, through its folder, to checkpoint at the next step (and, with stop, to end there:
        the driver then ends without testing or exporting, and the job is queued again at its step)."""
        write_control(Path(job.job_dir), {"checkpoint": checkpoint, "stop": stop, "why": why, "attempt": job.attempt})

    def _preempt(self, job_id: str, why: str) -> None:
        job = self.store.get(job_id)
        if self._mine(self.preempting, job) or job.state not in ACTIVE:
            return
        self.preempting[job_id] = (job.attempt, why, self.clock(), False)
        if job.state == JobState.STARTING:  # nothing trained yet: stopped, and queued again when Ray says so
            self.store.note(job_id, f"{why}: stopping it before it trains")
            try:  # the request stays in its folder: a server restarted before Ray says STOPPED still requeues it
                self.control(job, checkpoint=True, stop=True, why=why)
            except OSError:
                pass
            self._stop(job)
            return
        try:
            self.control(job, checkpoint=True, stop=True, why=why)
        except OSError as e:  # the job's folder refuses it (a folder planted at control.json): stopped through Ray
            self.store.note(job_id, f"{why}: its workers cannot be asked to checkpoint ({first_line(e)}); stopping "
                                    "it, to resume from its last checkpoint", level="warning")
            self._stop(job)
            return
        self.store.note(job_id, f"{why}: it checkpoints at its current step, stops and goes back to the queue")

    def _stop(self, job: Job) -> None:
        try:
            self.backend.stop(self.submission(job))
        except UnknownSubmission:
            pass

    def _drained(self, active: list[Job], held: dict, draining: set[str]) -> None:
        """A job with workers on a node Ray is draining (a preemption, a spot reclaim) checkpoints at every step
        until the node is gone: when it goes, Ray Train resumes the job from the step it reached."""
        for job in active:
            if job.kind == "sweep":  # its trials resume from their last evaluation's checkpoint when the node goes
                continue
            stopping = self._mine(self.preempting, job)
            nodes = sorted(set(held.get(job.id, {})) & draining)
            asked = self._mine(self.draining_for, job)
            if nodes and not asked and not stopping:
                self.draining_for[job.id] = (job.attempt, nodes)
                self.control(job, checkpoint=True, stop=False, why=f"node {nodes[0][:12]} is being drained")
                self.store.note(job.id, f"node {nodes[0][:12]} is being drained (preempted): the job checkpoints at "
                                        "each step until it goes, then resumes elsewhere from that step",
                                level="warning")
            elif not nodes and asked:
                del self.draining_for[job.id]
                if not stopping:  # a stop request of a preemption stands
                    clear_control(Path(job.job_dir))

    def _preempt_deadline(self, active: list[Job]) -> None:
        """A preemption the job did not act on within PREEMPT_GRACE_S (still preparing its data, its workers not
        reading control.json) is carried out through Ray: it resumes from its last checkpoint."""
        now = self.clock()
        for job in active:
            stopping = self._mine(self.preempting, job)
            if stopping and not stopping[3] and now - stopping[2] > PREEMPT_GRACE_S:
                self.preempting[job.id] = (*stopping[:3], True)
                self.store.note(job.id, f"it did not stop at a checkpoint within {PREEMPT_GRACE_S:.0f} s of being "
                                        "preempted: stopped through Ray; it resumes from its last checkpoint",
                                level="warning")
                self._stop(job)

    def _overtime(self, active: list[Job]) -> None:
        """A job past its resources.max_minutes is stopped (its end is recorded FAILED, with that reason): its bound
        is what let jobs start beside the queue's head."""
        for job in active:
            why = self._overrun(job)
            if why and not self._mine(self.overtime, job):
                self.overtime[job.id] = (job.attempt, why)
                self.store.note(job.id, why, level="warning")
                self._stop(job)

    def _overrun(self, job: Job) -> str | None:
        """Why the job is past its resources.max_minutes, or None."""
        t, now = self.terms(job), self.store.clock()
        if t.max_minutes is None or not job.started_at or now - job.started_at <= t.max_minutes * 60:
            return None
        return (f"ran past resources.max_minutes ({t.max_minutes:g}): stopped after "
                f"{(now - job.started_at) / 60:.1f} minutes")

    @staticmethod
    def _sizes(job: Job) -> tuple[int, int]:
        d = Path(job.job_dir)
        return tuple((d / n).stat().st_size if (d / n).exists() else 0 for n in ("metrics.jsonl", "events.jsonl"))

    def _submit(self, job: Job) -> bool:
        self._forget(job)  # an attempt starts with no request of the server's and no preemption of an earlier one
        if self.on_start is not None:
            try:
                self.on_start(job)
            except Exception as e:  # noqa: BLE001 - the job runs all the same; its events say what was missed
                self.store.note(job.id, f"could not prepare the job's comparison with its champion: "
                                        f"{type(e).__name__}: {e}")
        try:
            self.backend.submit(self.submission(job), job.job_dir, {**self.env, "RUNNER_ATTEMPT": str(job.attempt)},
                                fresh=job.attempt > 1 and not job.resume)
        except RayRefused as e:  # Ray answered no: the job cannot start, unless it is Ray's already; say why
            if self._known(job):  # submitted before a restart ("already exists", a 400 or a 500 by Ray's version)
                return True
            self.store.set_state(job.id, JobState.FAILED, reason=f"Ray did not take the job: {first_line(e)}")
            return False
        except RayUnreachable:
            if self._known(job):
                return True
            raise
        except Exception as e:  # noqa: BLE001 - anything else the submission raised: the job cannot start; say why
            self.store.set_state(job.id, JobState.FAILED, reason=f"the job could not be submitted to Ray: "
                                                          f"{type(e).__name__}: {first_line(e)}")
            return False
        self.store.set_submission(job.id, self.submission(job))
        return True

    def _known(self, job: Job) -> bool:
        """Whether Ray has this attempt's submission already (then it is recorded as submitted)."""
        try:
            self.backend.status(self.submission(job))
        except Exception:  # noqa: BLE001 - unknown, or Ray does not answer: not known
            return False
        self.store.set_submission(job.id, self.submission(job))
        return True

    def _lost(self, why: str) -> None:
        """Ray does not answer: after LOST_AFTER seconds of that, the jobs it held are marked FAILED."""
        now = self.clock()
        if self.unreachable_since is None:
            self.unreachable_since = now
        if now - self.unreachable_since < LOST_AFTER:
            return
        for job in self.active():
            self.store.set_state(job.id, JobState.FAILED, expect=job.state,
                                 reason=f"lost: {why} for {LOST_AFTER:.0f} s; the job's driver cannot be followed")
            if job.kind == "sweep":
                self._guard(f"the trials of sweep {job.id}", self._follow_trials, job, JobState.FAILED)

    def _follow_one(self, job: Job) -> None:
        """_follow, where one job's trouble (its folder unreadable, a store error) is said once in its events and
        leaves the other jobs and the queue going."""
        try:
            self._follow(job)
            self.failing.pop(job.id, None)
        except RayUnreachable:
            raise
        except Exception as e:  # noqa: BLE001 - one job's follow-up; the next pass tries it again
            why = f"{type(e).__name__}: {first_line(e)}"
            if self.failing.get(job.id) != why:
                self.failing[job.id] = why
                try:
                    self.store.note(job.id, f"the server could not follow the job this pass ({why}); it tries "
                                            "again each pass", level="warning")
                except Exception:  # noqa: BLE001 - removed meanwhile, or the store itself is in trouble
                    pass

    def _follow(self, job: Job) -> None:
        attempt = self.store.attempt(job.id)
        try:
            status, message = self.backend.status(self.submission(job))
        except UnknownSubmission:
            if attempt and attempt["submission"] is None and job.state == JobState.STARTING:
                self._submit(job)  # claimed by a server that died before it submitted
            else:
                self.store.set_state(job.id, JobState.FAILED, expect=job.state, reason=(
                    f"Ray no longer knows the job's submission {self.submission(job)}: the Ray cluster was "
                    "restarted or replaced while the job ran"))
                if job.kind == "sweep":
                    self._guard(f"the trials of sweep {job.id}", self._follow_trials, job, JobState.FAILED)
            return
        if attempt and attempt["submission"] is None:
            self.store.set_submission(job.id, self.submission(job))
        if status == "RUNNING" and job.state == JobState.STARTING:
            job = self.store.set_state(job.id, JobState.RUNNING, expect=JobState.STARTING)
        try:
            job = self._copy(job, attempt)
        except Exception as e:  # noqa: BLE001 - its files cannot be read: Ray's word on its ending still counts
            if status not in ("SUCCEEDED", "STOPPED", "FAILED"):
                raise
            self.store.note(job.id, f"the job's last lines could not be read: {type(e).__name__}: {first_line(e)}",
                            level="warning")
            job = self.store.get(job.id)
        if job.kind == "sweep":
            self._guard(f"the trials of sweep {job.id}", self._follow_trials, job)
        if status not in ("SUCCEEDED", "STOPPED", "FAILED"):
            return
        preempted = self._preempted(job)
        overrun = (self._mine(self.overtime, job) or (None, self._overrun(job)))[1]  # a restarted server's too
        if status == "SUCCEEDED" and preempted:
            self._requeue(job, preempted)
        elif status == "SUCCEEDED" and read_preempted(Path(job.job_dir)) is not None:
            self._end(job, JobState.FAILED, "the job ended as preempted, but the server did not preempt it")
        elif status == "SUCCEEDED":
            self._end(job, JobState.SUCCEEDED, export_note(job.job_dir))
        elif status == "STOPPED" and overrun:
            self._end(job, JobState.FAILED, overrun)
        elif status == "STOPPED" and preempted:
            self._requeue(job, preempted)
        elif status == "STOPPED":
            self._end(job, JobState.CANCELLED, "stopped")
        elif status == "FAILED":
            failure = read_text(job.job_dir, "failure.txt")  # a link out of the folder reads as none
            if failure and failure.strip():
                reason = failure.strip()
            else:
                reason = f"the job's driver ended without a reason: {first_line(Exception(message)) or 'no message'}"
            self._end(job, JobState.FAILED, reason)

    def _preempted(self, job: Job) -> str | None:
        """Why this attempt of the job is being preempted, or None: the server's record, or (a server restarted
        meanwhile) the stop request it left in the job's folder for this attempt."""
        entry = self._mine(self.preempting, job)
        if entry:
            return entry[1]
        asked = read_control(Path(job.job_dir))
        return (asked["why"] or "preempted") if asked["stop"] and asked["attempt"] == job.attempt else None

    def _requeue(self, job: Job, why: str) -> None:
        """A preempted job back in the queue, its next attempt resuming from the checkpoint it stopped at (or its
        last one, where it was stopped through Ray)."""
        folder = Path(job.job_dir)
        step, saved = read_preempted(folder), bool(checkpoints_newest_first(folder)) or job.kind == "sweep"
        if job.kind == "sweep":
            self._guard(f"the trials of sweep {job.id}", self._follow_trials, job, JobState.CANCELLED)
        self._forget(job)
        where = f"at step {step}" if step is not None else "at its last checkpoint" if saved else "before it trained"
        self.store.set_state(job.id, JobState.QUEUED, expect=job.state, resume=step is not None or saved,
                             message=f"{why}; stopped {where} and queued again: it resumes from there")

    def _forget(self, job: Job) -> None:
        """The server's requests to this job's workers, and what it kept of them, gone (the attempt ended)."""
        for entries in (self.preempting, self.draining_for, self.overtime, self._terms, self._bounds, self._asked):
            entries.pop(job.id, None)
        folder = Path(job.job_dir)
        for name in (CONTROL, PREEMPTED):
            try:
                (folder / name).unlink(missing_ok=True)
            except OSError:  # a folder planted there by the job's own code: the workers read nothing from it
                pass

    def _follow_trials(self, sweep: Job, ended: str | None = None) -> None:
        """A sweep's trials into the store: a row for each trial folder its driver made, their lines, their
        endings (trial.json), a trial a retried sweep started again. ended: the sweep's ending; a trial that has
        not ended by it is CANCELLED with a cancelled sweep, FAILED with any other."""
        root = Path(sweep.job_dir) / TRIALS
        names = []
        try:
            if root.is_dir() and not root.is_symlink():
                with os.scandir(root) as entries:
                    for e in entries:
                        if TRIAL_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                            names.append(e.name)
                        if len(names) >= MAX_TRIALS:
                            break
        except OSError as e:  # unreadable: the trials known are still ended with the sweep below
            if ended is None:
                raise
            self.store.note(sweep.id, f"its trials' folder could not be read: {first_line(e)}", level="warning")
        known = {t.id: t for t in self.store.trials(sweep.id)}
        for name in sorted(names):
            folder = str(root / name)
            tid = f"{sweep.id}-{name}"
            trial = known.get(tid)
            try:
                doc = read_json(folder, TRIAL) or {}
                if trial is None:
                    if doc.get("state") is None:  # its driver is still writing it
                        continue
                    trial = self.store.add_trial(tid, sweep, read_text(folder, "recipe.yaml") or "", folder,
                                                 trial_values(doc.get("values")),
                                                 f"trial {name[1:].lstrip('0') or '0'} of sweep {sweep.id} started")
                self._trial_state(trial, doc, sweep)
                self.failing.pop(tid, None)
            except Exception as e:  # noqa: BLE001 - one trial's trouble leaves the others going; said once
                why = f"{type(e).__name__}: {first_line(e)}"
                if trial is not None and self.failing.get(tid) != why:
                    self.failing[tid] = why
                    self.store.note(tid, f"the server could not follow the trial this pass ({why}); it tries again "
                                         "each pass", level="warning")
        if ended is None:
            return
        for trial in self.store.trials(sweep.id):
            if trial.state not in TERMINAL:
                state = JobState.CANCELLED if ended == JobState.CANCELLED else JobState.FAILED
                self.store.set_state(trial.id, state, expect=trial.state,
                                     reason=f"the sweep ended ({ended}) before the trial did")

    def _trial_state(self, trial: Job, doc: dict, sweep: Job) -> None:
        state = doc.get("state")
        # a retried sweep runs the trial again (from its checkpoints): its file says RUNNING for the sweep's attempt
        again = (trial.state in (JobState.FAILED, JobState.CANCELLED) and state == JobState.RUNNING
                 and str(doc.get("attempt")) == str(sweep.attempt))
        if again:
            trial = self.store.set_state(trial.id, JobState.QUEUED, expect=trial.state, resume=True,
                                         message="the sweep's retry runs the trial again")
        if trial.state == JobState.QUEUED:  # (a server that died between these moves goes on with them)
            offsets = doc.get("offsets")
            ok = isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53 for x in offsets)
            trial = self.store.set_state(trial.id, JobState.STARTING, expect=JobState.QUEUED,
                                         offsets=tuple(offsets) if ok else self._sizes(trial))
        if trial.state == JobState.STARTING:
            trial = self.store.set_state(trial.id, JobState.RUNNING, expect=JobState.STARTING)
        trial = self._copy(trial, self.store.attempt(trial.id))
        if trial.state in TERMINAL or state not in (JobState.SUCCEEDED, JobState.STOPPED, JobState.FAILED):
            return
        reason = clean(str(doc.get("reason") or ""))[:2000] or {JobState.SUCCEEDED: "trained to its end",
                                                               JobState.STOPPED: "stopped early",
                                                               JobState.FAILED: "the trial failed"}[state]
        if state == JobState.SUCCEEDED and trial.state != JobState.RUNNING:
            trial = self.store.set_state(trial.id, JobState.RUNNING, expect=trial.state)
        self.store.set_state(trial.id, state, expect=trial.state, reason=reason)

    def _end(self, job: Job, state: str, reason: str | None = None) -> None:
        if job.kind == "sweep":
            self._guard("the sweep's trials", self._follow_trials, job, state)
        self._forget(job)
        try:  # jobs.secrets.FILE: the driver removes it as it ends; one killed (SIGKILL, a lost node) cannot
            (Path(job.job_dir) / ".secrets.json").unlink(missing_ok=True)
        except OSError:
            pass
        if state == JobState.SUCCEEDED and job.state in (JobState.STARTING, JobState.RETRYING):
            job = self.store.set_state(job.id, JobState.RUNNING, expect=job.state)
        job = self.store.set_state(job.id, state, reason=reason, expect=job.state)
        for hook, what in ((self.on_success if state == JobState.SUCCEEDED else None, "not registered in the model "
                            "registry"), (self.on_end, "checkpoint retention failed")):
            if hook is None:
                continue
            try:
                hook(job)
            except Exception as e:  # noqa: BLE001 - the job's ending stands; its events say what did not happen
                try:
                    self.store.note(job.id, f"{what}: {type(e).__name__}: {e}")
                except StoreError:  # removed (runner rm) a moment after it ended
                    pass

    def _copy(self, job: Job, attempt: dict | None) -> Job:
        """New whole lines of metrics.jsonl and events.jsonl into the store; events move the state."""
        if attempt is None:
            return job
        folder = Path(job.job_dir)
        for name in ("metrics.jsonl", "events.jsonl"):
            if (folder / name).is_symlink() or ((folder / name).exists() and not (folder / name).is_file()):
                raise ValueError(f"{name} is not a plain file (a link, a folder, a pipe): the server does not read it")
        records, offset, bad = _read_lines(folder / "metrics.jsonl", attempt["metrics_offset"], metric_problem)
        self._skipped(job, "metrics.jsonl", bad)
        if records:
            self.store.add_metrics(job.id, records)
        self.store.set_offsets(job.id, attempt["attempt"], metrics=offset)
        events, offset, bad = _read_lines(folder / "events.jsonl", attempt["events_offset"], event_problem)
        self._skipped(job, "events.jsonl", bad)
        for ev in events:
            new, said = ev.get("state"), (ev.get("message") or json.dumps(ev))[:10_000]
            level = "warning" if ev.get("level") == "warning" else None
            if new and new != job.state:
                if can_move(job.state, new):
                    try:
                        job = self.store.set_state(job.id, new, expect=job.state, message=ev.get("message"))
                        continue
                    except InvalidTransition:  # moved meanwhile (a cancel): said below as the move not taken
                        job = self.store.get(job.id)
                # a move the job cannot make from where it is (a line after its ending, a stray writer): kept, and
                # said as not taken, never silently folded into a note
                said += f" (the driver's move to {new} was not taken: the job is {job.state})"
                level = level or (None if job.state in TERMINAL else "warning")
            self.store.note(job.id, said, level=level)
        self.store.set_offsets(job.id, attempt["attempt"], events=offset)
        return job

    def _skipped(self, job: Job, name: str, bad: list[tuple[int, str]]) -> None:
        for line, why in bad[:5]:
            self.store.note(job.id, f"skipped line {line} of {name}: {why}", level="warning")
        if len(bad) > 5:
            self.store.note(job.id, f"skipped {len(bad) - 5} more lines of {name} (from line {bad[5][0]})",
                            level="warning")

    def cancel(self, job: Job) -> Job:
        """A queued job is cancelled at once; a running one is stopped through Ray (the next pass records it)."""
        if job.state == JobState.QUEUED:
            return self.store.set_state(job.id, JobState.CANCELLED, reason="cancelled by the user",
                                        expect=JobState.QUEUED)
        if job.state in ACTIVE:
            for entries in (self.preempting, self.overtime):  # the user's word wins: recorded CANCELLED
                entries.pop(job.id, None)
            try:
                clear_control(Path(job.job_dir))
            except OSError:
                pass
            try:
                self.backend.stop(self.submission(job))
            except UnknownSubmission:  # claimed, not yet submitted: nothing runs
                return self.store.set_state(job.id, JobState.CANCELLED, reason="cancelled by the user",
                                            expect=job.state)
            self.store.note(job.id, "cancel requested: stopping the job's processes")
        return self.store.get(job.id)


def clean(text: str) -> str:
    """Text from a job's files as one printable line: no control character (a terminal escape, a newline)."""
    return "".join(c if c.isprintable() else " " for c in text)


def trial_values(raw) -> dict:
    """A trial's values from its trial.json, as the store keeps them: at most 32, keys and texts printable and at
    most 200 characters, numbers finite, nothing nested."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in list(raw.items())[:32]:
        if isinstance(v, str):
            v = clean(v)[:200]
        elif not isinstance(v, (bool, int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            continue
        out[clean(str(k))[:200]] = v
    return out


MAX_RECORD = 64 * 1024  # a metrics or events line longer than this is not one the driver wrote
NUMBERS = ("time", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "epoch")


def _number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def metric_problem(rec) -> str | None:
    """Why a line of metrics.jsonl cannot go into the store, or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**53:
        return f"step {step!r:.40} is not a whole number from 0"
    if not isinstance(rec.get("split", "train"), str) or len(rec.get("split", "train")) > 40:
        return "split is not a short text"
    if not isinstance(rec.get("total_steps"), (int, type(None))) or isinstance(rec.get("total_steps"), bool):
        return "total_steps is not a whole number"
    bad = [k for k in NUMBERS if not _number(rec.get(k))]
    return f"{bad[0]} is not a finite number" if bad else None


def event_problem(ev) -> str | None:
    """Why a line of events.jsonl cannot go into the store, or None."""
    if not isinstance(ev, dict):
        return f"a JSON {type(ev).__name__}, not an object"
    for key in ("state", "message", "level"):
        if not isinstance(ev.get(key), (str, type(None))):
            return f"{key} is not text"
    if ev.get("state") is not None and ev["state"] not in TRAINING:  # the driver's moves; Ray says the ending
        return f"state {ev['state'][:40]!r} is not one a job's driver reports ({', '.join(TRAINING)})"
    return None


def _read_lines(path: Path, offset: int, check) -> tuple[list[dict], int, list[tuple[int, str]]]:
    """The records on the whole lines after offset, the offset after them, and the lines that are not records:
    (line number, why) each, so that a torn or foreign line is skipped and said, never stops the pass."""
    text, end = whole_lines(path, offset)
    records, bad = [], []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        why = None
        if len(line) > MAX_RECORD:
            why = f"a line of {len(line)} characters"
        else:
            try:
                rec = json.loads(line)
            except ValueError:
                why = "not JSON" + (" (NUL bytes: a torn write)" if "\0" in line else "")
            except RecursionError:
                why = "JSON nested past any record's depth"
            else:
                why = check(rec)
        if why:
            bad.append((i, why))
        else:
            records.append(rec)
    if bad:  # numbered from the file's start: counted (a MiB at a time) only when there is something to say
        before, at = 0, 0
        while at < offset:
            part = read_at(path, at, min(1 << 20, offset - at))
            if not part:
                break
            before, at = before + part.count(b"\n"), at + len(part)
        bad = [(before + i + 1, why) for i, why in bad]
    return records, end, bad

