"""The training loop's one seam: a recipe's callbacks are imported and built before any GPU is spent, and a bad one
is a clear problem with its key. (The loop calling them is shown by the integration tests that inject faults through
it: test_train's records, test_cli_run's pause, test_dispatch's held and recorded jobs.)"""

import json

import pytest

from jobs.callbacks import Callback, CallbackError, Loop, build
from jobs.faults import Faults
from jobs.recipe import parse_recipe

BASE = "name: t\nmodel:\n  name: some/model\ntask: classification\ndata:\n  train: x.jsonl\ntrain:\n  callbacks:\n"


def specs(*entries):
    body = "".join(f"    - use: {use}\n      args: {json.dumps(args)}\n" for use, args in entries)
    return parse_recipe(BASE + body, base_dir=".", env={}).train.callbacks


class Count(Callback):  # importable by name from this module
    def __init__(self, start: int = 0):
        self.steps = start

    def on_step(self, loop):
        self.steps += 1


def test_callbacks_are_built_in_order_with_their_arguments(monkeypatch):
    monkeypatch.setenv("RUNNER_CALLBACKS", f"jobs.faults,{__name__}")
    built = build(specs(("jobs.faults:Faults", {"step_delay": 0.5}), (f"{__name__}:Count", {"start": 3})))
    first, second = built.callbacks
    assert isinstance(first, Faults) and first.step_delay == 0.5
    assert isinstance(second, Count) and second.steps == 3
    built.on_step(Loop(job_dir=__import__("pathlib").Path("."), rank=0, world=1, step=1))
    assert second.steps == 4


@pytest.mark.parametrize("use,args,key,words", [
    ("no_such_module_xyz:Thing", {}, "train.callbacks.0.use", "cannot import no_such_module_xyz"),
    ("jobs.faults:Nope", {}, "train.callbacks.0.use", "jobs.faults has no Nope"),
    ("jobs.recipe:Recipe", {}, "train.callbacks.0.use", "not a subclass of jobs.callbacks.Callback"),
    ("jobs.faults:Faults", {"speed": 3}, "train.callbacks.0.args", "unexpected keyword argument 'speed'"),
    ("jobs.faults:Faults", {"step_delay": -1}, "train.callbacks.0.args", "step_delay -1: 0 to 60 seconds"),
])
def test_a_bad_callback_names_its_key_and_why(use, args, key, words, monkeypatch):
    monkeypatch.setenv("RUNNER_CALLBACKS", "jobs.faults,jobs.recipe,no_such_module_xyz")  # allowed: the other checks
    with pytest.raises(CallbackError) as e:
        build(specs((use, args)))
    assert e.value.key == key and words in e.value.why


def test_preflight_reports_a_callback_that_cannot_be_built(tmp_path):
    from jobs.preflight import preflight

    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": f"t {i}", "label": "a" if i % 2 else "b"}) + "\n"
                                              for i in range(20)))
    r = parse_recipe(BASE + "    - use: jobs.faults:Faults\n      args: {speed: 3}\n", base_dir=tmp_path, env={})
    report = preflight(r, lengths=False, memory=False)
    assert [(p.path, p.message) for p in report.problems if p.path.startswith("train.")] == [
        ("train.callbacks.0.args", "Faults does not take them: Faults.__init__() got an unexpected keyword argument "
                                   "'speed'")]


def test_a_file_path_is_no_callback():
    from jobs.recipe import RecipeError

    with pytest.raises(RecipeError) as e:
        specs(("../../tmp/evil.py", {}))
    assert "is not `package.module:Class` (a module the workers import, never a file path)" in e.value.render()


def test_only_the_operators_modules_are_imported(tmp_path, monkeypatch):
    """RUNNER_CALLBACKS lists what a recipe may name (default jobs.faults). Another module is refused before it is
    imported: a module's own code runs as it is imported, whatever class the recipe names."""
    import sys

    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                                         "from jobs.callbacks import Callback\nclass C(Callback): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("RUNNER_CALLBACKS", raising=False)
    with pytest.raises(CallbackError) as e:
        build(specs(("planted:C", {})))
    assert e.value.key == "train.callbacks.0.use" and "RUNNER_CALLBACKS: jobs.faults" in e.value.why
    assert not (tmp_path / "ran").exists() and "planted" not in sys.modules
    monkeypatch.setenv("RUNNER_CALLBACKS", "jobs.faults, planted")
    assert type(build(specs(("planted:C", {}))).callbacks[0]).__name__ == "C" and (tmp_path / "ran").exists()
    monkeypatch.setenv("RUNNER_CALLBACKS", "")
    with pytest.raises(CallbackError):
        build(specs(("jobs.faults:Faults", {})))


@pytest.mark.parametrize("args", [{"record_seen": "/tmp/anywhere"}, {"hold_file": "../../x"},
                                  {"record_seen": "a/../../b"}, {"hold_file": ""}])
def test_a_drill_writes_and_reads_only_the_job_folder(args):
    with pytest.raises(CallbackError) as e:
        build(specs(("jobs.faults:Faults", args)))
    assert e.value.key == "train.callbacks.0.args" and "a file of the job folder" in e.value.why


def test_the_server_refuses_a_module_it_does_not_list(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from runner.server import create_app

    monkeypatch.delenv("RUNNER_CALLBACKS", raising=False)
    (tmp_path / "x.jsonl").write_text('{"text": "a", "label": "b"}\n')
    http = TestClient(create_app(tmp_path / "home"))
    body = BASE.replace("x.jsonl", str(tmp_path / "x.jsonl"))
    r = http.post("/jobs", json={"recipe": body + "    - use: os:system\n"})
    assert r.status_code == 422
    assert r.json()["detail"]["problems"][0]["path"] == "train.callbacks.0.use"
    assert "not among the callbacks this runner takes" in r.json()["detail"]["problems"][0]["message"]
    ok = http.post("/jobs", json={"recipe": body + "    - use: jobs.faults:Faults\n      args: {step_delay: 0}\n"})
    assert ok.status_code == 201, ok.text


def test_a_recipe_without_callbacks_snapshots_as_before():
    """No `callbacks: []` in a job's recipe.yaml: workers of an image from before the key read it as they did."""
    plain = parse_recipe(BASE.replace("train:\n  callbacks:\n", ""), base_dir=".", env={})
    assert "callbacks" not in plain.snapshot_yaml()
    assert "jobs.faults:Faults" in parse_recipe(BASE + "    - use: jobs.faults:Faults\n", base_dir=".",
                                                env={}).snapshot_yaml()

