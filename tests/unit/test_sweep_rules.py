"""Sweeps without Ray: the `sweep` section checked against the schema (every problem at once), the configurations
a grid and a seeded random search run, the choice on validation only, a trial's recipe, and the server following a
sweep's trials (folders its driver writes) into the store, with Ray's Jobs API replaced by the recording stand-in of
test_dispatcher (Ray is the edge here; tests/integration/test_sweep.py runs the whole on real Ray)."""

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from jobs.jobdir import JobState, event
from jobs.recipe import SNAPSHOT, RecipeError, parse_recipe
from jobs.sweep import best_of, choose, configurations, set_trial, trial_dir, trial_snapshot
from runner.dispatch import Dispatcher
from runner.store import Store
from test_dispatcher import Clock, FakeRay, append

BASE = """name: sw
model: {name: /models/tiny}
task: classification
data: {train: /data/train.jsonl}
tuning: lora
train: {max_steps: 20, lr: 0.001}
"""


def sweep(text: str) -> str:
    return BASE + "sweep:\n" + "".join(f"  {line}\n" for line in text.strip().splitlines())


def problems(text: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    return {p.path: p.message for p in e.value.problems}


def test_every_problem_of_a_sweep_is_said_at_once_with_its_key():
    got = problems(sweep("""
parameters:
  train.lr: {loguniform: [1.0e-5, 1.0e-3]}
  train.lrr: {choice: [1]}
  data.max_seq_len: {choice: [32, 64]}
  train.batch_size: {uniform: [4, 16]}
  tuning.alpha: {choice: [0, 16]}
  tuning.r: {randint: [0, 4]}
search: grid
trials: 3
metric: auc
"""))
    assert "did you mean 'lr'" in got["sweep.parameters.train.lrr"]
    assert "train.* and tuning.*" in got["sweep.parameters.data.max_seq_len"]
    assert "whole numbers" in got["sweep.parameters.train.batch_size"]  # uniform draws fractions; batch_size is int
    assert got["sweep.parameters.tuning.alpha"].startswith("0 is refused by tuning.alpha")
    assert got["sweep.parameters.tuning.r"].startswith("0 is refused by tuning.r")  # the range's low end
    assert "accuracy, macro_f1, loss" in got["sweep.metric"]
    assert "train.lr" in got["sweep.search"] and "range" in got["sweep.search"]  # a grid takes choice lists only
    assert len(got) == 7


def test_a_grid_too_big_and_a_trial_count_that_disagrees_with_the_grid_are_refused():
    big = problems(sweep("parameters:\n  train.lr: {choice: [" + ", ".join(str(i / 1000) for i in range(1, 21))
                         + "]}\n  train.batch_size: {choice: [" + ", ".join(str(i) for i in range(1, 21))
                         + "]}\nsearch: grid"))
    assert "400 combinations; at most 256" in big["sweep.parameters"]
    off = problems(sweep("parameters:\n  train.lr: {choice: [0.1, 0.01]}\nsearch: grid\ntrials: 3"))
    assert off == {"sweep.trials": "3: search grid runs each of its 2 combinations once; leave trials out, or set it "
                                   "to 2"}
    ranges = problems(sweep("parameters:\n  train.lr: {loguniform: [1.0e-3, 1.0e-5]}"))
    assert "low end must be below the high end" in next(iter(ranges.values()))
    tuning = problems(sweep("parameters:\n  tuning.train_last_layers: {choice: [1, 2]}"))  # a key of freeze, not lora
    assert "tuning (mode lora) has: alpha, dropout, r, target_modules" in tuning["sweep.parameters.tuning."
                                                                                   "train_last_layers"]


def test_a_grid_runs_exactly_its_combinations_in_order():
    r = parse_recipe(sweep("parameters:\n  train.lr: {choice: [0.1, 0.01]}\n  tuning.r: {choice: [4, 8]}\n"
                           "search: grid"))
    got = configurations(r, 0)
    assert r.sweep.count == 4
    assert got == [{"train.lr": lr, "tuning.r": rank} for lr, rank in itertools.product([0.1, 0.01], [4, 8])]


def test_a_seeded_random_search_draws_the_same_trials_and_stays_in_its_ranges():
    r = parse_recipe(sweep("""
parameters:
  train.lr: {loguniform: [1.0e-5, 1.0e-3]}
  train.warmup_ratio: {uniform: [0.0, 0.2]}
  tuning.r: {choice: [8, 16, 32]}
  train.batch_size: {randint: [4, 6]}
trials: 40
seed: 7
"""))
    first, again, other = configurations(r, 7), configurations(r, 7), configurations(r, 8)
    assert first == again and first != other and len(first) == 40
    # trial 0: the recipe as written (start_from_recipe), so the sweep never chooses worse than it on validation
    assert first[0] == {"train.lr": 0.001, "train.warmup_ratio": 0.0, "tuning.r": 8, "train.batch_size": 8}
    assert configurations(r.model_copy(update={"sweep": r.sweep.model_copy(update={"start_from_recipe": False})}),
                          7)[0] != first[0]
    first = first[1:]
    lrs = [c["train.lr"] for c in first]
    assert all(1e-5 <= x <= 1e-3 for x in lrs)
    # log-uniform: as many draws in each decade (an even draw would put ~90% in the upper one)
    low = sum(x < 1e-4 for x in lrs)
    assert 8 <= low <= 31, lrs
    assert all(0 <= c["train.warmup_ratio"] <= 0.2 for c in first)
    assert {c["tuning.r"] for c in first} == {8, 16, 32}
    assert {c["train.batch_size"] for c in first} == {4, 5, 6}  # both ends included
    for c in first:  # every drawn trial is a recipe the schema takes
        parse_recipe(trial_snapshot(r.snapshot_yaml(), c, "accuracy"), allowed=SNAPSHOT)


def test_a_trials_recipe_is_the_sweeps_with_its_values_and_the_sweeps_metric():
    r = parse_recipe(sweep("parameters:\n  train.lr: {choice: [0.1]}\nmetric: macro_f1") + "register_as: topics\n")
    text = trial_snapshot(r.snapshot_yaml(), {"train.lr": 0.1, "tuning.r": 4}, "macro_f1")
    t = parse_recipe(text, allowed=SNAPSHOT)
    assert (t.train.lr, t.tuning.r, t.select_metric) == (0.1, 4, ("macro_f1", True))
    assert t.sweep is None and t.register_as is None  # the sweep's result registers, never a trial
    assert t.train.checkpoint_every is None  # a checkpoint at each evaluation: each is a report ASHA judges


def test_the_chosen_trial_is_the_best_on_validation_never_on_test():
    trials = [  # as a leaky runner would have them: test figures beside validation ones
        {"index": 0, "state": "SUCCEEDED", "best": 0.80, "test": 0.95},
        {"index": 1, "state": "STOPPED", "best": 0.85, "test": 0.70},
        {"index": 2, "state": "FAILED", "best": 0.99, "test": 0.99},  # failed: not a candidate
        {"index": 3, "state": "SUCCEEDED", "best": 0.85, "test": 0.60},  # ties trial 1: the first of equals
    ]
    assert choose(trials, higher=True)["index"] == 1
    assert choose(trials, higher=False)["index"] == 0  # loss-like: lower is better
    assert choose([{"index": 0, "state": "SUCCEEDED", "best": None}], True) is None


def test_a_trials_best_is_read_from_its_validation_records_only(tmp_path):
    append(tmp_path / "metrics.jsonl", *[r for r in [
        {"step": 5, "loss": 0.9, "total_steps": 20},
        {"step": 5, "split": "validation", "accuracy": 0.6},
        {"step": 10, "split": "validation", "accuracy": 0.75},
        {"step": 10, "split": "test", "accuracy": 0.99},  # never a candidate
        {"step": 15, "split": "validation", "accuracy": float("nan")},
        {"step": 20, "split": "validation", "accuracy": 0.7}]])
    got = best_of(tmp_path, "accuracy", True)
    assert got == {"best": 0.75, "best_step": 10, "steps": 20, "evaluations": 4}
    # resumed from its checkpoint at step 5, the trial redid step 10: the weights of step 10 are the later ones
    append(tmp_path / "metrics.jsonl", {"step": 10, "split": "validation", "accuracy": 0.65})
    assert best_of(tmp_path, "accuracy", True)["best"] == 0.7


# --- the server following a sweep's trials ------------------------------------------------------------------------


@pytest.fixture
def sweep_world(tmp_path):
    store, ray, clock = Store(tmp_path / "runner.db"), FakeRay(), Clock()
    job_dir = tmp_path / "s"
    job_dir.mkdir()
    snapshot = sweep("parameters:\n  train.lr: {choice: [0.1, 0.01, 0.001]}\nsearch: grid")
    store.add_job("s", "sw", snapshot, str(job_dir), 2, 1, 0, kind="sweep")
    return store, ray, clock, job_dir, Dispatcher(store, ray, env={}, clock=clock)


def start_trial(job_dir, index, lr):
    """What jobs.sweep's trial function writes as a trial starts."""
    folder = trial_dir(job_dir, index)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(f"name: sw\ntrain: {{lr: {lr}}}\n")
    set_trial(folder, index=index, values={"train.lr": lr}, state=JobState.RUNNING, attempt="1")
    event(folder, f"trial {index} running", state=JobState.RUNNING)
    return folder


def test_a_sweeps_trials_become_rows_under_it_with_their_lines_and_endings(sweep_world):
    store, ray, clock, job_dir, d = sweep_world
    assert d.tick() == ["s"]
    t0 = start_trial(job_dir, 0, 0.1)
    t1 = start_trial(job_dir, 1, 0.01)
    (job_dir / "trials" / "t002").mkdir()  # being made: no trial.json yet
    append(t0 / "metrics.jsonl", {"step": 4, "loss": 0.5, "total_steps": 8},
           {"step": 4, "split": "validation", "accuracy": 0.7})
    d.tick()
    trials = store.trials("s")
    assert [(t.id, t.state, t.parent, t.kind) for t in trials] == [("s-t000", "RUNNING", "s", "trial"),
                                                                  ("s-t001", "RUNNING", "s", "trial")]
    assert json.loads(trials[0].params) == {"train.lr": 0.1}
    assert [m["step"] for m in store.metrics("s-t000")] == [4, 4]
    assert [j.id for j in store.list()] == ["s"]  # lists show the sweep; its trials go with it
    assert store.counts()["RUNNING"] == 1
    set_trial(t1, state=JobState.STOPPED, reason="stopped early by ASHA after 1 evaluation")
    set_trial(t0, state=JobState.SUCCEEDED, reason="trained to its end")
    again = Dispatcher(store, ray, env={}, clock=clock)  # a restarted server: no trial made twice, none lost
    again.tick()
    assert [(t.id, t.state, t.reason) for t in store.trials("s")] == [
        ("s-t000", "SUCCEEDED", "trained to its end"), ("s-t001", "STOPPED", "stopped early by ASHA after 1 evaluation")]
    start_trial(job_dir, 2, 0.001)
    again.tick()
    ray.jobs["s-1"] = "STOPPED"  # cancelled: its trial still running is cancelled with it
    clock.t = 50
    again.tick()
    assert store.get("s").state == "CANCELLED"
    assert {t.id: t.state for t in store.trials("s")} == {"s-t000": "SUCCEEDED", "s-t001": "STOPPED",
                                                         "s-t002": "CANCELLED"}


def test_a_retried_sweep_runs_again_only_the_trials_it_restarts(sweep_world):
    store, ray, clock, job_dir, d = sweep_world
    d.tick()
    t0, t1 = start_trial(job_dir, 0, 0.1), start_trial(job_dir, 1, 0.01)
    set_trial(t0, state=JobState.SUCCEEDED, reason="trained to its end")
    d.tick()
    ray.jobs["s-1"] = "STOPPED"
    clock.t = 10
    d.tick()
    assert {t.id: t.state for t in store.trials("s")} == {"s-t000": "SUCCEEDED", "s-t001": "CANCELLED"}
    store.set_state("s", "QUEUED", resume=True)  # runner retry
    clock.t = 20
    d.tick()
    d.tick()
    assert store.get("s-t001").state == "CANCELLED"  # the sweep's second attempt has not reached it yet
    append(t1 / "metrics.jsonl", {"step": 3, "loss": 0.5})  # the first attempt's: in the store once, not twice
    d.tick()
    sizes = [(t1 / n).stat().st_size for n in ("metrics.jsonl", "events.jsonl")]
    set_trial(t1, state=JobState.RUNNING, attempt="2", offsets=sizes)  # the retry's driver restarts it
    event(t1, "trial 1 running, resuming from its checkpoint", state=JobState.RUNNING)
    d.tick()
    t = store.get("s-t001")
    assert (t.state, t.attempt) == ("RUNNING", 2)
    assert store.get("s-t000").attempt == 1  # finished: not run again
    assert [a["outcome"] for a in store.attempts("s-t001")] == ["CANCELLED", None]
    append(t1 / "metrics.jsonl", {"step": 4, "loss": 0.4})
    d.tick()
    assert [m["step"] for m in store.metrics("s-t001")] == [3, 4]  # each line once: the second attempt from its offsets


def test_hostile_trial_folders_are_not_followed(sweep_world, tmp_path):
    store, ray, clock, job_dir, d = sweep_world
    d.tick()
    trials = job_dir / "trials"
    trials.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "trial.json").write_text(json.dumps({"index": 9, "state": "RUNNING", "values": {}}))
    os.symlink(outside, trials / "t009")  # a link out of the sweep's folder
    (trials / "..t1").mkdir()
    (trials / "t010").mkdir()
    (trials / "t010" / "trial.json").write_text("[1, 2]")  # not an object
    (trials / "t011").mkdir()
    (trials / "t011" / "trial.json").write_text(json.dumps({"index": 11, "state": "RUNNING", "values": {
        "train.lr": float("inf"), "x" * 500: "y" * 500, "nested": {"a": 1}}}).replace("Infinity", "1e999"))
    d.tick()
    rows = store.trials("s")
    assert [t.id for t in rows] == ["s-t011"]
    values = json.loads(rows[0].params)
    assert "nested" not in values and "train.lr" not in values and all(len(k) <= 200 for k in values)
    assert all(math.isfinite(v) if isinstance(v, float) else len(v) <= 200 for v in values.values())


def test_a_sweep_holds_its_concurrent_trials_resources_in_the_queue():
    from runner.api.service import need_of_recipe

    r = parse_recipe(sweep("parameters:\n  train.lr: {choice: [0.1, 0.01, 0.001]}\nmax_concurrent: 3")
                     .replace("train: {", "resources: {workers: 2, cpus_per_worker: 1.5}\ntrain: {"))
    need = need_of_recipe(r)
    assert (need.workers, need.cpus, need.gpus) == (6, 1.5, 0)


def test_validate_says_how_many_trials_and_what_the_sweep_holds_at_once(tmp_path):
    from typer.testing import CliRunner

    from runner.cli import app

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(yaml.safe_load(sweep("parameters:\n  train.lr: {choice: [0.1, 0.01]}\n"
                                                     "  tuning.r: {choice: [4, 8, 16]}\nsearch: grid\n"
                                                     "max_concurrent: 2"))))
    out = CliRunner().invoke(app, ["validate", str(p), "--schema-only", "--json"])
    assert json.loads(out.stdout)["sweep"] == {
        "trials": 6, "search": "grid", "metric": "accuracy", "max_concurrent": 2, "workers": 2, "cpus_per_worker": 1,
        "gpus_per_worker": 0, "cpus": 2, "gpus": 0}


def test_a_choice_written_1e_5_is_a_number_as_its_writer_meant():
    r = parse_recipe(sweep("parameters:\n  train.lr: {choice: [1e-5, 2.5E-3, 0.1]}\n"
                           "  train.schedule: {choice: [linear, cosine]}"))
    assert r.sweep.parameters["train.lr"].choice == [1e-5, 2.5e-3, 0.1]
    assert r.sweep.parameters["train.schedule"].choice == ["linear", "cosine"]


def test_a_seeded_tpe_search_suggests_the_same_trials_from_the_same_scores():
    from jobs.sweep import search_space, searcher

    r = parse_recipe(sweep("parameters:\n  train.lr: {loguniform: [1.0e-5, 1.0e-2]}\n  tuning.r: {choice: [4, 8, 16]}\n"
                           "  train.warmup_steps: {randint: [0, 5]}\nsearch: tpe\ntrials: 14"))

    def run(seed: int) -> list[dict]:
        s = searcher(r.sweep, seed, "accuracy", True)
        s.set_search_properties("val_accuracy", "max", search_space(r.sweep, None))
        got = []
        for i in range(14):  # past Optuna's 10 random start-up trials: then drawn where the scores were good
            config = s.suggest(f"t{i}")
            assert config.pop("trial_index") == i  # the trial's folder: numbered in order (Tune's ids are random)
            got.append(config)
            s.on_trial_complete(f"t{i}", {"val_accuracy": -abs(math.log10(config["train.lr"]) + 3)})
        return got

    first, again, other = run(3), run(3), run(4)
    assert first == again and first != other
    recipe_values = {"train.lr": 1e-3, "tuning.r": 8, "train.warmup_steps": 0}
    s = searcher(r.sweep, -3, "accuracy", True, recipe_values)  # any seed: numpy's takes none below 0
    s.set_search_properties("val_accuracy", "max", search_space(r.sweep, None))
    assert s.suggest("t0") == {**recipe_values, "trial_index": 0}  # trial 0: the recipe as written
    s.on_trial_result("t0", {"training_iteration": 2, "step": 7})  # stopped between evaluations: no figure
    s.on_trial_result("t0", {"training_iteration": 1, "val_accuracy": 0.5})
    outside = searcher(r.sweep, 3, "accuracy", True, {**recipe_values, "tuning.r": 12})  # not one of its choices
    outside.set_search_properties("val_accuracy", "max", search_space(r.sweep, None))
    assert outside.suggest("t0")["tuning.r"] in (4, 8, 16)  # Optuna's space holds no 12: drawn instead
    assert all(1e-5 <= c["train.lr"] <= 1e-2 and c["tuning.r"] in (4, 8, 16) and 0 <= c["train.warmup_steps"] <= 5
               for c in first)
    assert {c["train.warmup_steps"] for c in first + other} == set(range(6))  # randint: both ends included


def test_values_allowed_one_by_one_but_not_together_and_values_that_mean_something_else_are_refused():
    combo = problems(sweep("parameters:\n  train.warmup_steps: {choice: [0, 5]}\n"
                           "  train.warmup_ratio: {choice: [0.0, 0.1]}\nsearch: grid"))
    assert list(combo) == ["sweep.parameters"] and combo["sweep.parameters"].startswith(
        "trial 3 (train.warmup_steps=5, train.warmup_ratio=0.1) is refused"), combo
    infinite = problems(sweep("parameters:\n  train.weight_decay: {uniform: [0, .inf]}"))
    assert infinite == {"sweep.parameters.train.weight_decay": "uniform inf: finite numbers only, within ±2^62"}
    odd = problems(sweep("parameters:\n  train.lr: {choice: [true, 0.1]}\n"
                         "  train.select_metric: {choice: [loss]}\n  train.packing: {choice: [true, false]}"))
    assert odd["sweep.parameters.train.lr"] == "True is refused by train.lr: it takes a number, not a boolean"
    assert "chosen by sweep.metric" in odd["sweep.parameters.train.select_metric"]
    assert "prepared once" in odd["sweep.parameters.train.packing"]
    asha = problems(sweep("parameters:\n  train.eval_every: {choice: [5, 10]}\nearly_stop: asha"))
    assert "n-th evaluation" in asha["sweep.parameters.train.eval_every"]


def test_a_trial_is_cancelled_retried_and_removed_only_with_its_sweep(server, tmp_path):
    from test_server import call

    url = server()
    body = sweep("parameters:\n  train.lr: {choice: [0.1, 0.01]}\nsearch: grid\nmax_concurrent: 4")
    code, job = call(f"{url}/jobs", "POST", {"recipe": body})
    assert code == 201 and job["kind"] == "sweep" and job["workers"] == 2  # 2 trials at most: not 4
    store = Store(tmp_path / "home" / "runner.db")
    folder = Path(job["job_dir"]) / "trials" / "t000"
    store.add_trial(f"{job['id']}-t000", store.get(job["id"]), "name: sw\n", str(folder), {"train.lr": 0.1}, "started")
    tid = f"{job['id']}-t000"
    for method, path in (("POST", f"/jobs/{tid}/cancel"), ("POST", f"/jobs/{tid}/retry")):
        code, out = call(url + path, method, {})
        assert code == 409 and f"sweep {job['id']}" in out["detail"], out
    code, out = call(f"{url}/jobs/{tid}", "DELETE")
    assert code == 409 and f"runner rm {job['id']}" in out["detail"], out
    code, listed = call(f"{url}/jobs")
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert [t["id"] for t in listed["jobs"][0]["sweep"]["trials"]] == [tid]
    assert call(f"{url}/jobs/{job['id']}/cancel", "POST", {})[0] == 200
    code, out = call(f"{url}/jobs/{job['id']}", "DELETE")
    assert code == 200 and store.trials(job["id"]) == []  # its trials' rows go with it
