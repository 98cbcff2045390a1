"""The dispatcher's decisions over the real store, with Ray's Jobs API replaced by a recording stand-in (Ray is the
edge here; tests/integration/test_dispatch.py runs the same code on real Ray): what a restarted server does, what a
retry submits, how long an unreachable cluster is given, and the job's own events moving its state."""

import json
import os
from pathlib import Path

import pytest

from runner.dispatch import LOST_AFTER, Dispatcher, RayJobs, RayRefused, RayUnreachable, UnknownSubmission
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
            raise RayRefused(f"Request failed with status code 400: Job with submission_id {sid} already exists.")
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


def test_a_move_the_job_cannot_make_is_said_as_not_taken(world):
    """EXPORTING -> RETRYING is no move of the state machine: the state stays, and the event says so (before, it
    became a plain note, as if the driver had meant nothing by it)."""
    store, ray, clock, job_dir, d = world
    d.tick()
    d.tick()
    append(job_dir / "events.jsonl", {"state": "EXPORTING", "message": "exporting"},
           {"state": "RETRYING", "message": "the workers failed"})
    d.tick()
    last = store.events("j")[-1]
    assert store.get("j").state == "EXPORTING"
    assert (last["state_to"], last["level"]) == (None, "warning")
    assert last["message"] == "the workers failed (the driver's move to RETRYING was not taken: the job is EXPORTING)"


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


def test_a_torn_or_foreign_line_is_skipped_and_said_and_the_queue_goes_on(world, tmp_path):
    store, ray, clock, job_dir, d = world
    d.tick()
    d.tick()
    with (job_dir / "metrics.jsonl").open("ab") as f:
        f.write(b'{"step": 1, "loss": 1.0}\n' + b"\0" * 40 + b"\n" + b'[1, 2]\n{"loss": 3}\n{"step": "x"}\n'
                b'{"step": 2, "loss": "high"}\n{"step": 3, "loss": 0.5, "time": 10.0}\n')
    with (job_dir / "events.jsonl").open("ab") as f:
        f.write(b'{"state": "NOPE"}\n"text"\n{"message": 5}\n{"state": "EXPORTING", "message": "exporting"}\n')
    second = tmp_path / "k"
    second.mkdir()
    store.add_job("k", "k", "name: k\n", str(second), 1, 1, 0)  # queued after the bad lines were written
    ray.jobs["j-1"] = "SUCCEEDED"
    d.tick()
    assert [m["step"] for m in store.metrics("j")] == [1, 3], "the good records around the bad ones are kept"
    assert store.get("j").state == "SUCCEEDED", "the good event still moved the state"
    said = [e["message"] for e in store.events("j", level="warning")]
    assert said[:5] == ["skipped line 2 of metrics.jsonl: not JSON (NUL bytes: a torn write)",
                        "skipped line 3 of metrics.jsonl: a JSON list, not an object",
                        "skipped line 4 of metrics.jsonl: step None is not a whole number from 0",
                        "skipped line 5 of metrics.jsonl: step 'x' is not a whole number from 0",
                        "skipped line 6 of metrics.jsonl: loss is not a finite number"]
    assert said[5:] == ["skipped line 1 of events.jsonl: state 'NOPE' is not one a job's driver reports (RUNNING, "
                        "RETRYING, EXPORTING)",
                        "skipped line 2 of events.jsonl: a JSON str, not an object",
                        "skipped line 3 of events.jsonl: message is not text"]
    d.tick()
    assert store.get("k").state in ("STARTING", "RUNNING"), "a job queued after the bad lines starts"
    assert len(store.events("j", level="warning")) == 8, "each bad line is said once"


def test_one_jobs_unreadable_folder_does_not_stop_the_others(world, tmp_path):
    store, ray, clock, job_dir, d = world
    d.tick()
    d.tick()
    (job_dir / "metrics.jsonl").mkdir()  # no file to read: a folder (a pipe would hang a plain open)
    second = tmp_path / "k"
    second.mkdir()
    store.add_job("k", "k", "name: k\n", str(second), 1, 1, 0)
    d.tick()
    d.tick()
    assert store.get("k").state in ("STARTING", "RUNNING"), "the queue goes on"
    said = [e["message"] for e in store.events("j", level="warning")]
    assert len(said) == 1 and said[0].startswith("the server could not follow the job this pass (ValueError: "
                                                 "metrics.jsonl is not a plain file"), said
    ray.jobs["j-1"] = "SUCCEEDED"
    d.tick()
    assert store.get("j").state == "SUCCEEDED", "Ray's word on its ending counts though its files cannot be read"
    os.mkfifo(job_dir / "events.jsonl")  # and a pipe never hangs the server's reading
    from jobs.jobdir import whole_lines

    assert whole_lines(job_dir / "events.jsonl", 0) == ("", 0)


@pytest.mark.parametrize("error, kind", [
    (RuntimeError("Request failed with status code 404: Job demo-20260404-1 does not exist."), UnknownSubmission),
    (RuntimeError("Request failed with status code 400: Job with submission_id j-1 already exists."), RayRefused),
    # a connection error's text holds the URL, and the job's id holds a date with 404 in it
    (ConnectionError("HTTPConnectionPool(host='ray', port=8265): Max retries exceeded with url: "
                     "/api/jobs/demo-20260404-1 (Caused by NewConnectionError: Connection refused)"), RayUnreachable),
    (RuntimeError("the job does not exist yet, 404 of them"), RayUnreachable),
    (RuntimeError("Request failed with status code 503: unavailable"), RayUnreachable),
])
def test_rays_answers_are_told_apart_by_status_not_by_words(error, kind):
    jobs = RayJobs("http://ray:8265")

    def fails():
        raise error

    with pytest.raises(kind):
        jobs._call(fails)


def test_the_entrypoint_survives_a_folder_with_spaces_and_quotes():
    import shlex

    seen = {}

    class Client:
        def submit_job(self, **kw):
            seen.update(kw)

    jobs = RayJobs("http://ray:8265")
    jobs._client = Client()
    folder = "/home/a user/it's here/$(x)"
    jobs.submit("j-1", folder, {}, fresh=True)
    assert shlex.split(seen["entrypoint"])[-2:] == [folder, "--fresh"]


def test_a_line_nested_past_any_records_depth_or_claiming_an_ending_is_skipped(world):
    store, ray, clock, job_dir, d = world
    d.tick()
    d.tick()
    with (job_dir / "metrics.jsonl").open("w") as f:
        f.write("[" * 3000 + "\n" + json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with (job_dir / "events.jsonl").open("w") as f:
        f.write(json.dumps({"state": "FAILED"}) + "\n" + json.dumps({"state": "SUCCEEDED", "message": "x"}) + "\n")
    d.tick()
    said = [e["message"] for e in store.events("j", level="warning")]
    assert said[0] == "skipped line 1 of metrics.jsonl: JSON nested past any record's depth"
    assert len(said) == 3 and all("is not one a job's driver reports" in x for x in said[1:]), said
    assert store.get("j").state == "RUNNING" and [m["step"] for m in store.metrics("j")] == [1]


@pytest.mark.parametrize("shipped,said", [
    ({"quantized": False, "note": "no quantized model met export.max_quality_drop (1) on the held-out rows (tried "
      "int8_dynamic: accuracy drop in points 3.1): the checked fp32 ONNX model is shipped"}, True),
    ({"quantized": True, "note": None}, False),
    ({"quantized": False, "note": {"not": "words"}}, False),
    ("not an object", False),
])
def test_a_job_that_ships_no_quantized_model_says_so_in_its_state_line(world, shipped, said):
    store, ray, clock, job_dir, d = world
    d.tick()
    (job_dir / "onnx").mkdir()
    (job_dir / "onnx" / "export_report.json").write_text(json.dumps({"passed": True, "shipped": shipped}))
    ray.jobs["j-1"] = "SUCCEEDED"
    d.tick()
    job = store.get("j")
    assert job.state == "SUCCEEDED"
    if said:
        assert job.reason == "export: " + shipped["note"]
    else:
        assert job.reason is None
