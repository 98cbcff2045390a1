"""`runner rm` and checkpoint retention over a real store and job folders (as training leaves them), through the
server's route and the dispatcher that calls retention when a job ends."""

import json
from pathlib import Path

import httpx
import pytest

from runner.cleanup import KEEP, Retention, keep_from_env, prune_checkpoints, remove_job
from runner.registry import Registry
from runner.store import Store, StoreError


def ended_job(store: Store, root: Path, job_id: str, state: str = "SUCCEEDED", recipe: str | None = None) -> Path:
    d = root / job_id
    for part in ("checkpoints/checkpoint_1", "best", "model", "onnx", "prepared"):
        (d / part).mkdir(parents=True)
    (d / "checkpoints" / "checkpoint_1" / "state.pt").write_bytes(b"x" * 3000)
    (d / "best" / "state.pt").write_bytes(b"x" * 1000)
    (d / "model" / "model.safetensors").write_bytes(b"m" * 500)
    (d / "eval.json").write_text(json.dumps({"test": {"accuracy": 0.9}}))
    (d / "onnx" / "export_report.json").write_text('{"passed": true}')
    store.add_job(job_id, job_id, recipe or f"name: {job_id}\n", str(d), 1, 1, 0)
    for s in ("STARTING", "RUNNING", state):
        store.set_state(job_id, s, reason="it broke" if state == "FAILED" else None)
    return d


@pytest.fixture
def home(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    return Store(tmp_path / "runner.db"), root


def test_rm_removes_an_ended_jobs_folder_and_rows_and_refuses_the_rest(home, tmp_path):
    store, root = home
    d = ended_job(store, root, "done")
    store.db.execute("INSERT INTO schedules (id, recipe, timezone, on_data_change, poll_s, concurrency, created_at, "
                     "checked_until) VALUES ('s', 'x', 'UTC', 1, 60, 'forbid', 0, 0)")
    store.db.execute("INSERT INTO fires (schedule_id, slot, slot_at, at, outcome, reason, job_id) VALUES "
                     "('s', 'data:1', 0, 0, 'submitted', 'the data changed', 'done')")
    assert remove_job(store, "done", root) == {"removed": "done", "folder": "removed", "bytes": 4500 + len(
        '{"test": {"accuracy": 0.9}}') + len('{"passed": true}')}
    assert not d.exists() and store.count() == 0
    assert store.db.execute("SELECT COUNT(*) FROM events WHERE job_id = 'done'").fetchone()[0] == 0
    fire = dict(store.db.execute("SELECT job_id, reason FROM fires").fetchone())
    assert fire == {"job_id": None, "reason": "the data changed; its job done was removed"}  # not queued again

    store.add_job("live", "live", "name: live\n", str(root / "live"), 1, 1, 0)
    with pytest.raises(StoreError, match=r"job live is QUEUED: cancel it first \(runner cancel live\)"):
        remove_job(store, "live", root)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    store.add_job("odd", "odd", "name: odd\n", str(outside), 1, 1, 0)
    store.set_state("odd", "CANCELLED", reason="by hand")
    assert remove_job(store, "odd", root)["folder"] == f"left in place: {outside} is not a job folder under {root}"
    assert outside.exists(), "a folder outside the artifacts root is never deleted"
    link = root / "link"
    link.symlink_to(outside)
    store.add_job("lnk", "lnk", "name: lnk\n", str(link), 1, 1, 0)
    store.set_state("lnk", "CANCELLED", reason="by hand")
    assert remove_job(store, "lnk", root)["folder"].startswith("left in place") and outside.exists()


def test_rm_refuses_a_registered_versions_job(home, tmp_path):
    store, root = home
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "x"}\n')
    recipe = (f"name: topics\nmodel:\n  name: m\ntask: classification\ndata:\n  train: {tmp_path}/t.jsonl\n"
              f"  test: {tmp_path}/t.jsonl\nregister_as: topics\nexport:\n  onnx: true\n")
    d = ended_job(store, root, "v1", recipe=recipe)
    assert Registry(store).register(store.get("v1"))["version"] == 1
    with pytest.raises(StoreError, match="job v1 is topics v1 in the model registry: its files stay"):
        remove_job(store, "v1", root)
    assert (d / "model").exists()


def test_retention_keeps_the_newest_succeeded_jobs_checkpoints_every_model_and_what_a_retry_needs(home):
    store, root = home
    folders = []
    for i in range(5):
        folders.append(ended_job(store, root, f"j{i}", state="FAILED" if i == 1 else "SUCCEEDED"))
        store.db.execute("UPDATE jobs SET ended_at = ? WHERE id = ?", (1000.0 + i, f"j{i}"))
    earlier = folders[0] / "earlier" / "20261128-000000" / "checkpoints"  # a retry from the start set it aside
    earlier.mkdir(parents=True)
    (earlier / "state.pt").write_bytes(b"e" * 700)
    retention = Retention(store, keep=2)
    pruned = retention()
    assert pruned == [("j2", 4000), ("j0", 4700)]  # the succeeded beyond the newest two, newest first
    assert not earlier.exists()
    for i, d in enumerate(folders):
        kept = i in (1, 3, 4)  # j1 FAILED: runner retry --from-checkpoint goes on from them
        assert (d / "checkpoints").exists() == kept and (d / "best").exists() == kept, i
        assert (d / "model" / "model.safetensors").exists() and (d / "eval.json").exists()
    assert "checkpoints removed (0.0 MB): only the newest 2 succeeded jobs keep theirs" in \
        store.events("j0")[-1]["message"]
    assert prune_checkpoints(store, keep=2) == [], "once is enough"
    assert retention.swept and retention() == []


def test_keep_comes_from_the_environment_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.delenv("RUNNER_KEEP_CHECKPOINTS", raising=False)
    assert keep_from_env() == KEEP
    monkeypatch.setenv("RUNNER_KEEP_CHECKPOINTS", "3")
    assert keep_from_env() == 3
    for bad in ("-1", "²", "ten"):
        monkeypatch.setenv("RUNNER_KEEP_CHECKPOINTS", bad)
        with pytest.raises(ValueError, match=rf"RUNNER_KEEP_CHECKPOINTS='{bad}': give a whole number of jobs"):
            keep_from_env()


def test_the_route_and_the_dispatcher(tmp_path, server, monkeypatch):
    """DELETE /jobs/{id} answers 409 with the reason for a queued job and removes an ended one; the dispatcher prunes
    when a job it follows ends."""
    from runner.dispatch import Dispatcher

    url = server()
    store = Store(tmp_path / "home" / "runner.db")
    root = tmp_path / "home" / "artifacts"
    ended_job(store, root, "old")
    store.add_job("q", "q", "name: q\n", str(root / "q"), 1, 1, 0)
    r = httpx.delete(f"{url}/jobs/q", timeout=10)
    assert r.status_code == 409 and r.json()["detail"] == "job q is QUEUED: cancel it first (runner cancel q)"
    r = httpx.delete(f"{url}/jobs/old", timeout=10)
    assert r.status_code == 200 and r.json()["removed"] == "old" and not (root / "old").exists()

    ended = []
    d = Dispatcher(store, backend=None, env={}, on_end=ended.append)
    store.set_state("q", "STARTING")
    d._end(store.get("q"), "FAILED", "it broke")
    assert [j.id for j in ended] == ["q"]
