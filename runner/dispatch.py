"""Dispatch: queued jobs onto Ray through the Ray Jobs API, and what happens to them back into the store.

`Dispatcher.tick()` is one pass; the server runs it every second. A pass
1. follows every job it has started: Ray's job status moves the store's state (STARTING -> RUNNING -> SUCCEEDED,
   or FAILED with the driver's reason from failure.txt), and new lines of the job's metrics.jsonl are copied into
   the store (the server pulls: the job folder is on storage both can read);
2. asks `runner.queue.plan` which queued jobs fit what the cluster has free, claims each (QUEUED -> STARTING,
   compare-and-set, so no job is dispatched twice) and submits it with submission id `<job id>-<attempt>`.

What is free is the cluster's total (Ray's node list) less what the runner's own running jobs hold: the runner
is taken to be the cluster's only user, as it is with the embedded defaults.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from runner.queue import Need, Node, place, plan, refusal
from runner.store import Job, Store

ACTIVE = ("STARTING", "RUNNING", "RETRYING", "EXPORTING")
WORKER_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_MODE",
              "RUNNER_VERBOSE", "RUNNER_TEST_HOOKS")


def need_of(job: Job) -> Need:
    return Need(job.workers, job.cpus, job.gpus)


class RayJobs:
    """The Ray Jobs API and Ray's node list, at a dashboard address, with Ray's token when auth is on."""

    def __init__(self, address: str, token: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)

    def nodes(self) -> list[Node]:
        from ray.util.state import list_nodes

        out = []
        for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")]):
            res = n.resources_total or {}
            out.append(Node(n.node_id, float(res.get("CPU", 0)), float(res.get("GPU", 0))))
        return out

    def submit(self, submission_id: str, job_dir: str, env: dict[str, str]) -> None:
        self.client.submit_job(entrypoint=f"{sys.executable} -m jobs.entrypoint {job_dir}",
                               submission_id=submission_id, runtime_env={"env_vars": env},
                               metadata={"runner_job_dir": job_dir})

    def status(self, submission_id: str) -> tuple[str, str]:
        info = self.client.get_job_info(submission_id)
        return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""

    def stop(self, submission_id: str) -> None:
        self.client.stop_job(submission_id)


class Dispatcher:
    def __init__(self, store: Store, backend, env: dict[str, str] | None = None):
        self.store, self.backend = store, backend
        base = os.environ if env is None else env
        self.env = {k: base[k] for k in WORKER_ENV if k in base}
        self.offsets: dict[str, int] = {}  # job id -> bytes of metrics.jsonl already copied

    @staticmethod
    def submission(job: Job) -> str:
        return f"{job.id}-{job.attempt}"

    def refusal(self, need: Need) -> str | None:
        return refusal(need, self.backend.nodes())

    def free(self, nodes: list[Node]) -> list[Node]:
        left = nodes
        for job in self.store.list(limit=10_000):
            if job.state in ACTIVE:
                after = place(need_of(job), left)
                left = after if after is not None else left
        return left

    def tick(self) -> list[str]:
        """One pass; returns the ids of the jobs started in it."""
        for job in self.store.list(limit=10_000):
            if job.state in ACTIVE:
                self._follow(job)
        nodes = self.backend.nodes()
        queue = self.store.queue()
        decision = plan([(j.id, need_of(j)) for j in queue], self.free(nodes))
        started = []
        for job_id in decision.start:
            try:
                job = self.store.set_state(job_id, "STARTING", expect="QUEUED")
            except Exception:  # noqa: BLE001 - another dispatcher took it, or it was cancelled meanwhile
                continue
            try:
                self.backend.submit(self.submission(job), job.job_dir, self.env)
            except Exception as e:  # noqa: BLE001 - Ray refused: the job cannot start; say why
                self.store.set_state(job_id, "FAILED", reason=f"Ray did not take the job: {e}")
                continue
            self.store.set_submission(job_id, self.submission(job))
            started.append(job_id)
        return started

    def _follow(self, job: Job) -> None:
        self._copy_metrics(job)
        try:
            status, message = self.backend.status(self.submission(job))
        except Exception:  # noqa: BLE001 - not known to Ray (yet): try again next pass
            return
        if status == "RUNNING" and job.state == "STARTING":
            self.store.set_state(job.id, "RUNNING", expect="STARTING")
        elif status == "SUCCEEDED":
            self._copy_metrics(job)
            if job.state == "STARTING":
                job = self.store.set_state(job.id, "RUNNING", expect="STARTING")
            self.store.set_state(job.id, "SUCCEEDED", expect=job.state)
        elif status in ("FAILED", "STOPPED"):
            self._copy_metrics(job)
            failure = Path(job.job_dir) / "failure.txt"
            if status == "STOPPED":
                self.store.set_state(job.id, "CANCELLED", reason="stopped", expect=job.state)
            else:
                reason = failure.read_text().strip() if failure.exists() else \
                    f"the driver failed: {message.strip().splitlines()[-1] if message.strip() else 'no message'}"
                self.store.set_state(job.id, "FAILED", reason=reason, expect=job.state)

    def _copy_metrics(self, job: Job) -> None:
        path = Path(job.job_dir) / "metrics.jsonl"
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(self.offsets.get(job.id, 0))
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only; a line being written comes next pass
        if not end:
            return
        records = [json.loads(x) for x in chunk[:end].decode().splitlines() if x.strip()]
        self.offsets[job.id] = self.offsets.get(job.id, 0) + end
        if records:
            self.store.add_metrics(job.id, records)

    def cancel(self, job: Job) -> Job:
        """A queued job is cancelled at once; a running one is stopped through Ray (the next pass records it)."""
        if job.state == "QUEUED":
            return self.store.set_state(job.id, "CANCELLED", reason="cancelled by the user", expect="QUEUED")
        if job.state in ACTIVE:
            self.backend.stop(self.submission(job))
            self.store.note(job.id, "cancel requested: stopping the job's processes")
        return self.store.get(job.id)
