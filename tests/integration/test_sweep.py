"""Sweeps as a user runs them: `runner submit` of a recipe with `sweep`, on the runner's own local Ray head and
server, tiny BERT models, real Ray Tune and Ray Train.

The grid: 4 configurations run exactly once each; the learning rate so low it learns nothing is stopped early by
ASHA; the chosen trial is the best on validation by the trials' own metrics.jsonl (read here, not from the sweep's
record); the test split is scored once, on the chosen trial's best weights; the chosen model is exported and
checked. The faults: each trial's worker dies once (it resumes from its checkpoint), the server is restarted while
a trial runs (no trial lost, none started twice), the sweep is cancelled (every trial stops) and retried (only the
trials that did not finish run again, from their checkpoints)."""

import json
import time
from pathlib import Path

import pytest

from runners import runner_in
from tiny import faults, keyword_rows, tiny_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One local runner server and Ray head for the module's sweeps (each sweep is a job of its own)."""
    yield from runner_in(tmp_path_factory.mktemp("sweeps"))


@pytest.fixture
def runner(shared):
    return shared


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("data")
    model = tiny_model_dir(folder / "bert", "bert", tokenizer, weights=True)
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(240)))
    return model, train


def recipe(model: Path, train: Path, steps: int, lrs: list[float], sweep: str, extra: str = "",
           callbacks: str = "") -> str:
    return (f"name: sw\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {train}\n  max_seq_len: 16\n"
            f"train:\n  max_steps: {steps}\n  eval_every: 6\n  batch_size: 8\n  lr: 0.003\n{callbacks}"
            f"resources:\n  workers: 1\n  cpus_per_worker: 1\n{extra}"
            f"sweep:\n  parameters:\n    train.lr: {{choice: {json.dumps(lrs)}}}\n  search: grid\n{sweep}")


def status(runner, job_id: str) -> dict:
    out = runner("status", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(runner, job_id: str, until, timeout: float = 300, what: str = "") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = status(runner, job_id)
        if until(job):
            return job
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            raise AssertionError(f"sweep {job_id} ended {job['state']} ({job.get('reason')}) before {what}")
        time.sleep(2)
    raise AssertionError(f"sweep {job_id}: not {what} within {timeout} s")


def records(folder: Path) -> list[dict]:
    p = folder / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def best_validation(folder: Path) -> float | None:
    """The best validation accuracy of a trial's evaluations, from its own records (the last of each step)."""
    by_step = {r["step"]: r["accuracy"] for r in records(folder) if r.get("split") == "validation"}
    return max(by_step.values()) if by_step else None


def submit(runner, text: str) -> str:
    (runner.home.parent / "sweep.yaml").write_text(text)  # where the runner command runs
    out = runner("submit", "sweep.yaml", "--detach")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(runner("list", "--json").stdout)["jobs"][0]["id"]


def test_a_grid_sweep_runs_each_configuration_stops_the_poor_one_and_tests_the_best_once(runner, data):
    model, train = data
    lrs = [0.003, 0.002, 1e-7, 0.0015]  # the poor one starts when a good one has ended: ASHA has rungs to judge by
    sid = submit(runner, recipe(model, train, 24, lrs, "  max_concurrent: 2\n  early_stop: asha\n",
                                          extra="export:\n  onnx: true\n  quantize: none\nregister_as: swept\n",
                                          callbacks=faults(step_delay=0.15)))
    job = wait_for(runner, sid, lambda j: j["state"] == "SUCCEEDED", timeout=420, what="SUCCEEDED")
    folder = Path(job["job_dir"])
    trials = sorted((folder / "trials").iterdir())
    # exactly the grid: 4 trials, each a configuration of it, each a job folder with its own recipe
    import yaml

    assert sorted(yaml.safe_load((t / "recipe.yaml").read_text())["train"]["lr"] for t in trials) == sorted(lrs)
    assert [t["id"] for t in job["sweep"]["trials"]] == [f"{sid}-t{i:03d}" for i in range(len(lrs))]
    states = {t["values"]["train.lr"]: t for t in job["sweep"]["trials"]}
    # the learning rate that learns nothing is stopped early by ASHA, short of its steps
    poor = states[1e-7]
    assert poor["state"] == "STOPPED", poor
    assert max(r["step"] for r in records(folder / "trials" / "t002")) < 24
    # the chosen trial: the best on validation by the trials' own records (alone at the top: a "take the first"
    # choice would not pass by a tie; trials below it may tie, as two stopped at the same rung did)
    best = {t.name: best_validation(t) for t in trials}
    chosen = max(best, key=lambda n: best[n])
    assert sorted(best.values())[-1] > sorted(best.values())[-2], best
    assert job["sweep"]["chosen"] == f"{sid}-{chosen}"
    # tested once, after the search, on the chosen trial's best weights: no trial scored test, and the sweep's
    # eval.json has the chosen trial's best validation figure from its reloaded weights
    result = json.loads((folder / "eval.json").read_text())
    assert result["test"]["examples"] > 0
    assert result["validation"]["accuracy"] == pytest.approx(best[chosen], abs=1e-9)  # its best weights, reloaded
    assert not any((t / "eval.json").exists() for t in trials)  # a trial that tested itself would have written one
    for t in trials:  # each configuration ran once
        assert len([e for e in (t / "events.jsonl").read_text().splitlines() if "running on" in e]) == 1, t.name
    assert (folder / "recipe.chosen.yaml").read_text() == (folder / "trials" / chosen / "recipe.yaml").read_text()
    # exported and checked like any job's
    assert json.loads((folder / "onnx" / "export_report.json").read_text())["passed"] is True
    # registered as one version: the sweep's, through the promotion gate (the first version is the champion)
    shown = json.loads(runner("models", "show", "swept", "--json").stdout)
    assert [v["job_id"] for v in shown["versions"]] == [sid] and shown["aliases"] == {"champion": 1}
    # a trial's log is its train.log
    assert "as the sweep asked: stopped early by ASHA" in runner("logs", f"{sid}-t002").stdout
    listed = runner("list").stdout
    assert f"  {sid}-t002  STOPPED" in listed and "(chosen)" in listed
    shown = runner("status", sid).stdout
    assert "TRIAL" in shown and f"{chosen} *" in shown and "the test split is scored once" in shown


def test_a_sweep_survives_a_lost_worker_a_restarted_server_a_cancel_and_a_retry(runner, data):
    model, train = data
    sid = submit(runner, recipe(model, train, 30, [0.003, 0.002], "",
                                          extra="  max_failures: 1\n",
                                          callbacks=faults(step_delay=0.3, crash_after_step=8)))
    # trial 0: its worker dies after step 8; Ray Train resumes it from its checkpoint at step 6
    job = wait_for(runner, sid, lambda j: any(t["id"].endswith("t001") for t in j["sweep"]["trials"]),
                   what="trial 1 started")
    folder = Path(job["job_dir"])
    t0 = folder / "trials" / "t000"
    assert (t0 / "crashed").read_text() == "8"
    assert "resumed from checkpoint at step 6" in (t0 / "train.log").read_text()
    events = json.loads(runner("status", f"{sid}-t000", "--json").stdout)["events"]
    assert any(e["state_to"] == "RETRYING" for e in events), events
    # the server restarted while trial 1 runs: the sweep goes on; no trial lost, none made twice
    assert runner("server", "stop").returncode == 0
    time.sleep(1)
    assert runner("server", "start").returncode == 0
    t1 = folder / "trials" / "t001"
    wait_for(runner, sid, lambda j: (t1 / "crashed").exists() and max((r["step"] for r in records(t1)), default=0)
             >= 10, what="trial 1 past its restart")  # 20 steps (6 s) before its end: the cancel comes first
    assert runner("cancel", sid).returncode == 0
    job = wait_for(runner, sid, lambda j: j["state"] == "CANCELLED", what="CANCELLED")
    assert {t["id"][-4:]: t["state"] for t in job["sweep"]["trials"]}.items() >= {"t000": "SUCCEEDED",
                                                                                  "t001": "CANCELLED"}.items()
    assert all(t["state"] in ("SUCCEEDED", "CANCELLED") for t in job["sweep"]["trials"])
    size = (t1 / "metrics.jsonl").stat().st_size
    time.sleep(2)
    assert (t1 / "metrics.jsonl").stat().st_size == size  # its workers stopped with the sweep
    steps_before = max(r["step"] for r in records(t1) if "split" not in r)
    assert steps_before < 30, "the cancel came after trial 1's last step: nothing left to resume"
    assert runner("retry", sid).returncode == 0
    job = wait_for(runner, sid, lambda j: j["state"] == "SUCCEEDED", timeout=420, what="SUCCEEDED after the retry")
    runs = {t.name: [ln for ln in (t / "events.jsonl").read_text().splitlines() if "running on" in ln]
            for t in sorted((folder / "trials").iterdir())}
    assert len(runs["t000"]) == 1  # finished in the first attempt: not run again
    assert len(runs["t001"]) == 2 and "resuming from its checkpoint" in runs["t001"][1]
    t1_steps = [r["step"] for r in records(t1) if "split" not in r]
    resumed_at = t1_steps[t1_steps.index(steps_before) + 1] if steps_before in t1_steps else None
    assert resumed_at is not None and 1 < resumed_at <= steps_before + 1, (steps_before, t1_steps)
    rows = {t["id"][-4:]: t for t in job["sweep"]["trials"]}
    assert sorted(rows) == ["t000", "t001"]
    import sqlite3  # every record of each trial reached the store across the restart and the retry: none lost

    db = sqlite3.connect(runner.home / "runner.db")
    for name in rows:
        stored = set(db.execute("SELECT step, split FROM metrics WHERE job_id = ?", (f"{sid}-{name}",)).fetchall())
        assert stored == {(r["step"], r.get("split", "train")) for r in records(folder / "trials" / name)}, name
    db.close()
    assert all(t["state"] == "SUCCEEDED" for t in rows.values())
    attempts = json.loads(runner("status", f"{sid}-t001", "--json").stdout)["attempts"]
    assert [a["outcome"] for a in attempts] == ["CANCELLED", "SUCCEEDED"]
