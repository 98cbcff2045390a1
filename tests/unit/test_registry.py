"""The model registry and its promotion gate over the real store, with job folders as the driver leaves them
(eval.json, onnx/export_report.json); the end-to-end run on Ray trains the jobs for real."""

import json

import pytest

from runner.registry import Registry
from runner.store import Store, StoreError

RECIPE = ("name: topics\nmodel:\n  name: m\ntask: classification\ndata:\n  train: {train}\n  test: {test}\n"
          "register_as: topics\npromotion:\n  min_improvement: {gain}\nexport:\n  onnx: true\n")


@pytest.fixture
def reg(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "b", "label": "y"}\n')
    return Registry(Store(tmp_path / "r.db")), tmp_path


def finished(reg, job_id, accuracy, exported=True, export_ok=True, gain=0.0, test="test.jsonl", extra=""):
    registry, tmp = reg
    job_dir = tmp / job_id
    (job_dir / "onnx").mkdir(parents=True)
    (job_dir / "model").mkdir()
    (job_dir / "eval.json").write_text(json.dumps({"test": {"accuracy": accuracy, "loss": 1 - accuracy}}))
    if exported:
        (job_dir / "onnx" / "export_report.json").write_text(json.dumps({"passed": export_ok}))
    text = RECIPE.format(train=tmp / "train.jsonl", test=tmp / test, gain=gain) + extra
    store = registry.store
    store.add_job(job_id, "topics", text, str(job_dir), 1, 1, 0)
    for s in ("STARTING", "RUNNING", "SUCCEEDED"):
        store.set_state(job_id, s)
    return registry.register(store.get(job_id))


def test_the_gate_promotes_better_refuses_worse_and_rollback_restores(reg):
    registry, _ = reg
    v1 = finished(reg, "j1", 0.80)
    assert v1["version"] == 1 and v1["promoted"] and v1["decision"].startswith("promoted to champion: the first")
    v2 = finished(reg, "j2", 0.90)
    assert v2["promoted"] and "accuracy 0.9 against champion v1's 0.8 (better by 0.1" in v2["decision"]
    v3 = finished(reg, "j3", 0.40)  # shuffled labels
    assert not v3["promoted"] and v3["decision"] == "not promoted: accuracy 0.4 against champion v2's 0.9 (worse by 0.5)"
    assert registry.aliases("topics") == {"champion": 2}
    assert registry.register(registry.store.get("j3"))["version"] == 3  # asked again: the same version
    assert registry.rollback("topics") == {"model": "topics", "alias": "champion", "version": 1, "from": 2}
    assert registry.aliases("topics") == {"champion": 1}
    with pytest.raises(StoreError, match="its first version: there is nothing to roll back to"):
        registry.rollback("topics")
    registry.promote("topics", 3, alias="staging")
    assert registry.aliases("topics") == {"champion": 1, "staging": 3}
    moves = [(e["kind"], e["alias"], e["from_version"], e["to_version"]) for e in registry.events("topics")
             if e["alias"]]
    assert moves == [("promote", "champion", None, 1), ("promote", "champion", 1, 2), ("rollback", "champion", 2, 1),
                     ("promote", "staging", None, 3)]
    d = registry.diff("topics", 1, 2)
    assert d["metrics"]["accuracy"]["change"] == pytest.approx(0.1) and d["same_test_data"] and d["same_recipe"]


def test_min_improvement_export_checks_and_other_test_data_block_promotion(reg):
    registry, tmp = reg
    finished(reg, "j1", 0.80)
    small = finished(reg, "j2", 0.81, gain=0.05)
    assert not small["promoted"] and "better by only 0.01, less than the 0.05 asked" in small["decision"]
    assert not finished(reg, "j3", 0.99, exported=False)["promoted"]
    assert not finished(reg, "j4", 0.99, export_ok=False)["decision"].startswith("promoted")
    (tmp / "other.jsonl").write_text('{"text": "c", "label": "x"}\n')
    other = finished(reg, "j5", 0.99, test="other.jsonl")
    assert not other["promoted"] and "tested on other data than champion v1" in other["decision"]
    assert registry.aliases("topics") == {"champion": 1}
    d = registry.diff("topics", 1, 5)
    assert not d["same_test_data"] and "other.jsonl" in d["recipe_diff"]
    with pytest.raises(StoreError, match="model 'topics' has no version 9"):
        registry.promote("topics", 9)
    with pytest.raises(StoreError, match="no model 'nope'"):
        registry.versions("nope")


def test_a_job_without_register_as_is_not_registered(reg):
    registry, tmp = reg
    store = registry.store
    store.add_job("plain", "plain", "name: plain\nmodel:\n  name: m\ntask: classification\ndata:\n  train: t\n",
                  str(tmp), 1, 1, 0)
    assert registry.register(store.get("plain")) is None and registry.models() == []
