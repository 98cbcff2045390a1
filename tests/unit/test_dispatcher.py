"""The dispatcher's decisions over the real store, with Ray's Jobs API replaced by a recording stand-in (Ray is the
edge here; tests/integration/test_dispatch.py runs the same code on real Ray): what a restarted server does, what a
retry submits, how long an unreachable cluster is given, and the job's own events moving its state."""

import json
from pathlib import Path

import pytest

from runner.dispatch import LOST_AFTER, Dispatcher, RayUnreachable, UnknownSubmission
from runner.queue import Node
from runner.store import Store


class FakeRay:
    def __init__(self):
        self.jobs: dict[str, str] = {}  # submission id -> status
        self.submitted: list[tuple[str, bool]] = []
        self.down = False

    def nodes(self):
        if self.down:
            raise RayUnreachable("the Ray cluster at http://ray:8265 does not answer (ConnectionError)")
        return [Node("n1", 2, 0)]

    def submit(self, sid, job_dir, env, fresh=False):
        if sid in self.jobs:
            raise RuntimeError(f"Job with submission_id {sid} already exists.")
        self.jobs[sid] = "RUNNING"
        self.submitted.append((sid, fresh))

    def status(self, sid):
        if self.down:
            raise RayUnreachable("the Ray cluster at http://ray:8265 does not answer (ConnectionError)")
        if sid not in self.jobs:
            raise UnknownSubmission(sid)
        return self.jobs[sid], ""

    def stop(self, sid):
        self.jobs[sid] = "STOPPED"


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def world(tmp_path):
    store = Store(tmp_path / "runner.db")
    ray, clock = FakeRay(), Clock()
    job_dir = tmp_path / "j"
    job_dir.mkdir()
    store.add_job("j", "j", "name: j\n", str(job_dir), 1, 1, 0)
    return store, ray, clock, job_dir, Dispatcher(store, ray, env={}, clock=clock)


def append(path: Path, *records):
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_a_restarted_server_neither_loses_nor_repeats_lines(world):
    store, ray, clock, job_dir, d = world
    assert d.tick() == ["j"]
    append(job_dir / "metrics.jsonl", *({"step": s, "loss": 1.0} for s in (1, 2)))
    d.tick()
    append(job_dir / "metrics.jsonl", {"step": 3, "loss": 1.0})
    with (job_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # being written when the server died
    again = Dispatcher(store, ray, env={}, clock=clock)  # the restarted server: nothing in memory
    again.tick()
    assert [m["step"] for m in store.metrics("j")] == [1, 2, 3]
    with (job_dir / "metrics.jsonl").open("a") as f:
        f.write('ss": 1.0}\n')
    again.tick()
    assert [m["step"] for m in store.metrics("j")] == [1, 2, 3, 4]
    assert ray.submitted == [("j-1", False)], "never submitted twice"


def test_a_claim_whose_submission_was_not_recorded_is_submitted_once(world):
    store, ray, clock, job_dir, d = world
    store.set_state("j", "STARTING", expect="QUEUED")  # a server claimed it and died before submitting
    d.tick()
    assert ray.submitted == [("j-1", False)] and store.attempt("j")["submission"] == "j-1"
    store.db.execute("UPDATE attempts SET submission = NULL")  # ... or died after submitting, before recording
    d.tick()
    assert ray.submitted == [("j-1", False)] and store.attempt("j")["submission"] == "j-1"
    assert store.get("j").state == "RUNNING"


def test_events_of_the_job_move_its_state(world):
    store, ray, clock, job_dir, d = world
    d.tick()
    d.tick()
    append(job_dir / "events.jsonl", {"state": "RETRYING", "message": "the workers failed (node died)"},
           {"state": "RUNNING", "message": "workers running again"},
           {"state": "EXPORTING", "message": "exporting"}, {"state": None, "message": "a note"})
    d.tick()
    ray.jobs["j-1"] = "SUCCEEDED"
    d.tick()
    moves = [(e["state_to"], e["message"]) for e in store.events("j")]
    assert moves[3:] == [("RETRYING", "the workers failed (node died)"), ("RUNNING", "workers running again"),
                         ("EXPORTING", "exporting"), (None, "a note"), ("SUCCEEDED", "succeeded")]


def test_a_retry_starts_over_unless_from_the_checkpoint(world):
    store, ray, clock, job_dir, d = world
    d.tick()
    append(job_dir / "metrics.jsonl", *({"step": s, "loss": 9.0} for s in (1, 2, 3)))
    ray.jobs["j-1"] = "FAILED"
    (job_dir / "failure.txt").write_text("worker 0 ran out of memory at step 3")
    d.tick()
    assert store.get("j").reason == "worker 0 ran out of memory at step 3"
    store.set_state("j", "QUEUED", resume=False)
    d.tick()
    append(job_dir / "metrics.jsonl", {"step": 1, "loss": 0.5})
    ray.jobs["j-2"] = "STOPPED"
    d.tick()
    assert store.get("j").state == "CANCELLED"
    assert [(m["step"], m["loss"]) for m in store.metrics("j")] == [(1, 0.5), (2, 9.0), (3, 9.0)], \
        "attempt 2's lines are its own; attempt 1's are not read again into it"
    store.set_state("j", "QUEUED", resume=True)
    d.tick()
    assert ray.submitted == [("j-1", False), ("j-2", True), ("j-3", False)], "fresh=True only for a plain retry"


def test_ray_gone_fails_running_jobs_after_a_grace_and_never_leaves_them_running(world):
    store, ray, clock, job_dir, d = world
    d.tick()
    d.tick()
    ray.down = True
    d.tick()
    clock.t += LOST_AFTER - 1
    d.tick()
    assert store.get("j").state == "RUNNING", "a blip is not a loss"
    clock.t += 2
    d.tick()
    job = store.get("j")
    assert job.state == "FAILED" and job.reason.startswith("lost: the Ray cluster at http://ray:8265 does not "
                                                           "answer (ConnectionError) for 30 s")


def test_a_job_ray_forgot_is_failed_with_the_reason(world):
    store, ray, clock, job_dir, d = world
    d.tick()
    ray.jobs.clear()  # the cluster was restarted
    d.tick()
    job = store.get("j")
    assert job.state == "FAILED" and "Ray no longer knows the job's submission j-1" in job.reason
