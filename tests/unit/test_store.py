"""The job store on a real SQLite file: migrations, the state machine, no double dispatch, events, metrics."""

import multiprocessing as mp
import sqlite3

import pytest

from jobs.jobdir import STATES, TRANSITIONS
from runner.store import MIGRATIONS, InvalidTransition, Store, StoreError, UnknownJob


class Clock:
    def __init__(self):
        self.t = 1_000.0

    def __call__(self):
        self.t += 1
        return self.t


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "runner.db", clock=Clock())
    yield s
    s.close()


def add(store, job_id="j1", priority=0, name="n"):
    return store.add_job(job_id, name, "name: n\n", f"/tmp/{job_id}", workers=2, cpus=1, gpus=0, priority=priority)


def test_new_store_is_migrated_in_wal_mode_and_reopens(tmp_path):
    s = Store(tmp_path / "runner.db")
    assert s.version == len(MIGRATIONS)
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    add(s)
    s.close()
    again = Store(tmp_path / "runner.db")  # migrations are not run twice
    assert again.version == len(MIGRATIONS) and again.get("j1").state == "QUEUED"
    again.db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    again.close()
    with pytest.raises(StoreError, match=rf"written by a newer runner \(schema {len(MIGRATIONS) + 1}; this one "
                                         rf"knows {len(MIGRATIONS)}\)"):
        Store(tmp_path / "runner.db")


def test_a_store_of_schema_1_is_migrated_with_its_jobs(tmp_path):
    db = sqlite3.connect(tmp_path / "runner.db")
    db.executescript(MIGRATIONS[0] + ";PRAGMA user_version = 1;")
    db.execute("INSERT INTO jobs (id, name, state, recipe, job_dir, workers, cpus, gpus, created_at, updated_at) "
               "VALUES ('old', 'n', 'FAILED', 'name: n', '/tmp/old', 1, 1, 0, 1, 1)")
    db.commit()
    db.close()
    db = sqlite3.connect(tmp_path / "runner.db")
    db.execute("INSERT INTO jobs (id, name, state, recipe, job_dir, workers, cpus, gpus, created_at, updated_at) "
               "VALUES ('lora', 'n', 'SUCCEEDED', 'name: n\nmodel:\n  name: org/m\ntuning:\n  mode: lora\n  r: 8\n', "
               "'/tmp/l', 1, 1, 0, 2, 2)")
    db.execute("INSERT INTO jobs (id, name, state, recipe, job_dir, workers, cpus, gpus, created_at, updated_at) "
               "VALUES ('short', 'n', 'SUCCEEDED', 'name: n\nmodel: org/x\ntuning: freeze\n', '/tmp/s', 1, 1, 0, 3, 3)")
    db.commit()
    db.close()
    s = Store(tmp_path / "runner.db")
    assert s.version == len(MIGRATIONS) and s.get("old").state == "FAILED" and s.get("old").resume == 0
    # migration 3 read the model and mode of the jobs stored before it from their recipes
    assert [(s.get(j).model, s.get(j).mode) for j in ("old", "lora", "short")] == \
        [(None, "full"), ("org/m", "lora"), ("org/x", "freeze")]
    assert [j.id for j in s.list(text="ORG/")] == ["short", "lora"]
    s.set_state("old", "QUEUED", resume=True)
    assert s.set_state("old", "STARTING").attempt == 1


def test_an_attempt_keeps_its_offsets_and_whether_it_resumes(store):
    add(store)
    store.set_state("j1", "STARTING", offsets=(0, 0))
    store.set_offsets("j1", 1, metrics=120, events=40)
    assert {k: store.attempt("j1")[k] for k in ("attempt", "metrics_offset", "events_offset", "resume")} == \
        {"attempt": 1, "metrics_offset": 120, "events_offset": 40, "resume": 0}
    store.set_state("j1", "CANCELLED", reason="by the user")
    assert store.set_state("j1", "QUEUED", resume=True).resume == 1
    store.set_state("j1", "STARTING", offsets=(120, 40))
    row = store.attempt("j1")
    assert (row["attempt"], row["metrics_offset"], row["events_offset"], row["resume"]) == (2, 120, 40, 1)
    store.set_state("j1", "FAILED", reason="x")
    assert store.set_state("j1", "QUEUED", resume=False).resume == 0, "a plain retry starts over"


def test_the_life_of_a_job_with_events_and_attempts(store):
    add(store)
    for state in ("STARTING", "RUNNING", "RETRYING", "RUNNING", "EXPORTING", "SUCCEEDED"):
        store.set_state("j1", state)
    job = store.get("j1")
    assert job.state == "SUCCEEDED" and job.attempt == 1 and job.ended_at and job.started_at
    moves = [(e["state_from"], e["state_to"]) for e in store.events("j1")]
    assert moves == [(None, "QUEUED"), ("QUEUED", "STARTING"), ("STARTING", "RUNNING"), ("RUNNING", "RETRYING"),
                     ("RETRYING", "RUNNING"), ("RUNNING", "EXPORTING"), ("EXPORTING", "SUCCEEDED")]
    assert [a["outcome"] for a in store.attempts("j1")] == ["SUCCEEDED"]
    with pytest.raises(InvalidTransition, match="cannot go from SUCCEEDED to QUEUED; from SUCCEEDED it can go to "
                                                "nothing"):
        store.set_state("j1", "QUEUED")


def test_every_move_not_in_the_table_is_refused(store):
    for i, (src, allowed) in enumerate(TRANSITIONS.items()):
        for dst in STATES:
            if dst in allowed:
                continue
            job_id = f"x{i}{dst}"
            add(store, job_id)
            path = {"QUEUED": [], "STARTING": ["STARTING"], "RUNNING": ["STARTING", "RUNNING"],
                    "RETRYING": ["STARTING", "RUNNING", "RETRYING"], "EXPORTING": ["STARTING", "RUNNING", "EXPORTING"],
                    "SUCCEEDED": ["STARTING", "RUNNING", "SUCCEEDED"], "FAILED": ["FAILED"],
                    "CANCELLED": ["CANCELLED"], "STOPPED": ["STARTING", "RUNNING", "STOPPED"]}[src]
            for s in path:
                store.set_state(job_id, s, reason="r" if s == "FAILED" else None)
            with pytest.raises(InvalidTransition, match=f"cannot go from {src} to {dst}"):
                store.set_state(job_id, dst, reason="r")
            assert store.get(job_id).state == src, "a refused move changes nothing"


def test_failed_needs_a_reason_and_retry_is_a_new_attempt(store):
    add(store)
    store.set_state("j1", "STARTING")
    with pytest.raises(StoreError, match="FAILED needs a reason in words"):
        store.set_state("j1", "FAILED", reason="  ")
    store.set_state("j1", "FAILED", reason="worker 1 ran out of memory at step 120")
    assert store.get("j1").reason == "worker 1 ran out of memory at step 120"
    store.set_state("j1", "QUEUED", message="retried")
    assert store.get("j1").reason is None
    store.set_state("j1", "STARTING")
    assert store.get("j1").attempt == 2
    assert [(a["attempt"], a["outcome"]) for a in store.attempts("j1")] == [(1, "FAILED"), (2, None)]
    with pytest.raises(UnknownJob, match="no job 'nope'"):
        store.set_state("nope", "RUNNING")
    with pytest.raises(StoreError, match="state 'DONE' is not one of QUEUED"):
        store.set_state("j1", "DONE")


def test_queue_order_and_listing(store):
    add(store, "a", priority=0)
    add(store, "b", priority=5)
    add(store, "c", priority=0, name="other")
    add(store, "d", priority=5)
    assert [j.id for j in store.queue()] == ["b", "d", "a", "c"]
    store.set_state("b", "STARTING")
    assert [j.id for j in store.queue()] == ["d", "a", "c"]
    assert [j.id for j in store.list(limit=2)] == ["d", "c"]
    assert [j.id for j in store.list(limit=2, offset=2)] == ["b", "a"]
    assert [j.id for j in store.list(state="STARTING")] == ["b"]
    assert [j.id for j in store.list(name="other")] == ["c"]
    with pytest.raises(StoreError, match="state 'queued' is not one of"):
        store.list(state="queued")
    with pytest.raises(StoreError, match="job id 'a' is taken"):
        add(store, "a")


def test_metrics_keep_the_latest_attempt_of_each_step(store):
    add(store)
    store.set_state("j1", "STARTING")
    store.add_metrics("j1", [{"step": s, "loss": 1.0 / s, "time": s} for s in range(1, 7)])
    store.add_metrics("j1", [{"step": 4, "split": "validation", "loss": 0.5, "time": 4}])
    store.set_state("j1", "FAILED", reason="node lost")
    store.set_state("j1", "QUEUED")
    store.set_state("j1", "STARTING")  # attempt 2 goes on from the checkpoint at step 4
    store.add_metrics("j1", [{"step": s, "loss": 0.1 / s, "time": 100 + s} for s in range(5, 9)])
    train = store.metrics("j1", split="train")
    assert [m["step"] for m in train] == list(range(1, 9))
    assert [m["loss"] for m in train[4:]] == [0.1 / s for s in range(5, 9)], "redone steps: attempt 2's figures"
    assert train[0]["loss"] == 1.0
    assert [m["step"] for m in store.metrics("j1", split="validation")] == [4]
    assert [m["step"] for m in store.metrics("j1", after_step=6)] == [7, 8]


def test_a_figure_that_is_not_finite_is_kept_as_null_and_the_curves_still_read(store):
    """fp16's first steps overflow (grad_norm inf) and a validation loss can be NaN: SQLite's json_extract would
    refuse the whole column, and every chart of the job with it."""
    add(store)
    store.set_state("j1", "STARTING")
    store.add_metrics("j1", [{"step": 1, "loss": 2.0, "grad_norm": float("inf")},
                             {"step": 2, "loss": 1.5, "grad_norm": float("nan")}, {"step": 3, "loss": 1.0}])
    assert store.metrics_columns("j1", "train", ("loss", "grad_norm")) == {
        "step": [1, 2, 3], "loss": [2.0, 1.5, 1.0], "grad_norm": [None, None, None]}
    assert store.metrics("j1")[0]["grad_norm"] is None


def _claim(path, ids, out):
    s = Store(path)
    won = []
    for job_id in ids:
        try:
            s.set_state(job_id, "STARTING", expect="QUEUED")
            won.append(job_id)
        except InvalidTransition:
            pass
    out.put(won)
    s.close()


def test_no_job_is_dispatched_twice_by_racing_processes(tmp_path):
    path = tmp_path / "runner.db"
    s = Store(path)
    ids = [f"j{i}" for i in range(40)]
    for i in ids:
        add(s, i)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(path, ids if k % 2 else ids[::-1], out)) for k in range(4)]
    for p in procs:
        p.start()
    won = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    claimed = [j for w in won for j in w]
    assert sorted(claimed) == sorted(ids), "each job claimed exactly once"
    assert all(s.get(i).attempt == 1 for i in ids)
    assert all(len(s.attempts(i)) == 1 for i in ids)


def test_no_secret_reaches_the_store(tmp_path, monkeypatch):
    from jobs.recipe import parse_recipe

    secret = "hf_sEcReT1234567890"
    r = parse_recipe("name: s\nmodel:\n  name: m\n  token: ${HF_TOKEN}\ntask: classification\ndata:\n"
                     "  train: t.jsonl\n", env={"HF_TOKEN": secret})
    assert r.model.token.get_secret_value() == secret
    s = Store(tmp_path / "runner.db")
    s.add_job("s1", r.name, r.snapshot_yaml(), "/tmp/s1", 1, 1, 0)
    s.note("s1", "started")
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret.encode() not in raw
    assert b"${HF_TOKEN}" in sqlite3.connect(tmp_path / "runner.db").execute("SELECT recipe FROM jobs").fetchone()[0].encode()


def test_one_store_is_shared_by_threads(tmp_path):
    """The server's request threads and its dispatch thread share one Store: no transaction may interleave."""
    import threading

    s = Store(tmp_path / "runner.db")
    errors = []

    def work(t):
        try:
            for i in range(15):
                add(s, f"t{t}-{i}")
                s.note(f"t{t}-{i}", "hello")
                s.set_state(f"t{t}-{i}", "STARTING", expect="QUEUED")
                s.list(limit=5)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(s.list(state="STARTING", limit=1000)) == 120
    s.close()
