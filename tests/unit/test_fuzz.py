"""Property tests of what crosses a boundary, with Hypothesis (fixed seeds: the same examples on every run): hostile
recipes (tests/hostile.py, from the shipped ones) through parse_recipe and POST /jobs, hostile bodies, broken data
files through pre-flight, any bytes through the dispatcher's reading of a job's files. The property each time: a
clear refusal or a success, never an exception that is not the runner's own, a 500, or a slow answer.
bench/fuzz.py runs the same generators ten thousand times and prints the figures."""

import json
import random
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import DATA_KINDS, RECIPE_KINDS, bad_body, bad_data_file, base_recipes, mutate_recipe
from jobs.recipe import RecipeError, parse_recipe
from runner.server import create_app

ROOT = Path(__file__).resolve().parents[2]
BASES = base_recipes()


def fixed(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
                    database=None)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return TestClient(create_app(tmp_path_factory.mktemp("home")), raise_server_exceptions=False)


@fixed(300)
@given(seed=st.integers(0, 2**32), kind=st.sampled_from(RECIPE_KINDS))
def test_a_mutated_recipe_parses_or_is_refused_in_words(seed, kind):
    _, raw = mutate_recipe(random.Random(seed), BASES, kind)
    t0 = time.perf_counter()
    try:
        parse_recipe(raw.decode("utf-8", "replace"), base_dir=ROOT / "recipes", env={})
    except RecipeError as e:
        assert e.problems and all(p.message for p in e.problems)
        assert len(str(e)) < 20_000, "a refusal names the value, it does not repeat a huge one"
    assert time.perf_counter() - t0 < 1.0


@fixed(200)
@given(text=st.text(max_size=400))
def test_any_text_parses_or_is_refused_in_words(text):
    try:
        parse_recipe(text, env={})
    except RecipeError:
        pass


@fixed(150)
@given(seed=st.integers(0, 2**32), kind=st.sampled_from(RECIPE_KINDS), body=st.booleans())
def test_post_jobs_answers_every_hostile_recipe_and_body_without_a_500(client, seed, kind, body):
    rng = random.Random(seed)
    _, raw = mutate_recipe(rng, BASES, kind)
    text = raw.decode("utf-8", "replace")
    t0 = time.perf_counter()
    if body:
        _, content, headers = bad_body(rng, text)
        r = client.post("/jobs", content=content, headers=headers)
    else:
        r = client.post("/jobs", json={"recipe": text, "base_dir": str(ROOT / "recipes")})
    assert r.status_code in (201, 400, 413, 422), (r.status_code, r.text[:300])
    assert time.perf_counter() - t0 < 1.0
    if r.status_code == 201:
        job_dir = Path(r.json()["job_dir"])
        assert (job_dir / "recipe.yaml").exists() and parse_recipe((job_dir / "recipe.yaml").read_text(),
                                                                   env={}, allowed="snapshot")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("m") / "bert", "bert", tokenizer)


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_every_broken_data_file_is_refused_or_read_by_pre_flight_never_crashes_it(tmp_path, model, kind):
    from jobs.preflight import preflight

    rows = [json.loads(x) for x in (ROOT / "recipes/data/topics/train.jsonl").read_text().splitlines()[:60]]
    for seed in range(2):
        _, path = bad_data_file(random.Random(seed), tmp_path, rows, kind)
        r = parse_recipe(f"name: f\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {path}\n"
                         "  max_seq_len: 32\n", env={})
        report = preflight(r, memory=False)  # never raises for a user's mistake: it says it
        for p in report.problems:
            assert p.path and p.message and "Traceback" not in p.message


@fixed(200)
@given(lines=st.lists(st.binary(max_size=200), max_size=20))
def test_the_dispatcher_reads_any_bytes_in_a_jobs_files_without_raising(tmp_path_factory, lines):
    from runner.dispatch import _read_lines, event_problem, metric_problem

    path = tmp_path_factory.mktemp("j") / "metrics.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for check in (metric_problem, event_problem):
        records, end, bad = _read_lines(path, 0, check)
        assert end == path.stat().st_size and all(isinstance(r, dict) for r in records)
        assert all(isinstance(n, int) and n >= 1 and why for n, why in bad)
