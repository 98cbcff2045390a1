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


def finished(reg, job_id, accuracy, exported=True, export_ok=True, gain=0.0, test="test.jsonl", extra="", report=None,
             **result):
    registry, tmp = reg
    job_dir = tmp / job_id
    (job_dir / "onnx").mkdir(parents=True)
    (job_dir / "model").mkdir()
    (job_dir / "eval.json").write_text(json.dumps({"test": {"accuracy": accuracy, "loss": 1 - accuracy}, **result}))
    if exported:
        report = report or {"passed": export_ok, "checks": {"fp32_parity": {"passed": True}}}
        (job_dir / "onnx" / "export_report.json").write_text(json.dumps(report))
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


def test_a_model_that_does_not_beat_its_baseline_is_never_promoted(reg):
    registry, _ = reg
    base = {"what": "predicting the majority class of train", "accuracy": 0.7, "beaten": False,
            "verdict": "test accuracy 0.6 is worse than predicting the majority class of train, 0.7"}
    v1 = finished(reg, "j1", 0.60, baseline=base)
    assert not v1["promoted"] and v1["decision"] == (
        "not promoted: it does not beat its baseline (test accuracy 0.6 is worse than predicting the majority class "
        "of train, 0.7)")
    assert registry.aliases("topics") == {}
    assert finished(reg, "j2", 0.80, baseline={**base, "beaten": True})["promoted"]


def compared(version, here, there, rows=20, note=None):
    """eval.json's `champion` section as jobs.compare writes it: accuracy of this job's model and the champion's."""
    if note:
        return {"model": "topics", "version": version, "job_id": f"j{version}", "note": note}
    return {"model": "topics", "version": version, "job_id": f"j{version}",
            "on_this_test": {"rows": rows, "challenger": {"accuracy": here}, "champion": {"accuracy": there}},
            "on_champion_test": {"rows": 30, "challenger": {"accuracy": here - 0.05}, "champion": {"accuracy": 0.85}}}


def test_on_changed_data_the_gate_decides_on_both_models_scored_on_the_new_test_split(reg):
    """A data-change schedule cuts a new test split each time: the versions' own test figures are of other rows,
    so the gate takes the like-for-like figures (both models on the new split) and records both splits'."""
    registry, tmp = reg
    for name in ("new1", "new2", "new3", "new4"):
        (tmp / f"{name}.jsonl").write_text(f'{{"text": "{name}", "label": "x"}}\n')
    finished(reg, "j1", 0.90)
    # on its own split the new version scores less than v1's 0.90, yet on the new rows it beats v1 scored there
    v2 = finished(reg, "j2", 0.85, test="new1.jsonl", champion=compared(1, 0.85, 0.70))
    assert v2["promoted"], v2["decision"]
    assert v2["decision"] == ("promoted to champion: accuracy 0.85 against champion v1's 0.7 on this version's test "
                              "split (20 rows, both models scored); on v1's test split 0.8 against 0.85 (better by "
                              "0.15, at least 0 asked)")
    v3 = finished(reg, "j3", 0.95, test="new2.jsonl", champion=compared(2, 0.60, 0.75))
    assert not v3["promoted"] and v3["decision"].startswith(
        "not promoted: accuracy 0.6 against champion v2's 0.75 on this version's test split (20 rows") and \
        v3["decision"].endswith("(worse by 0.15)")
    v4 = finished(reg, "j4", 0.99, test="new3.jsonl", champion=compared(1, 0.99, 0.10))  # v1 was champion at start
    assert not v4["promoted"] and "it was compared with v1 when it started; the champion is now v2" in v4["decision"]
    v5 = finished(reg, "j5", 0.99, test="new4.jsonl", champion=compared(2, 0, 0, note="the champion's labels differ"))
    assert not v5["promoted"] and v5["decision"].endswith(
        "the like-for-like comparison could not be made: the champion's labels differ")
    (tmp / "new5.jsonl").write_text('{"text": "new5", "label": "x"}\n')
    v6 = finished(reg, "j6", 0.99, test="new5.jsonl", champion={"version": 2, "on_this_test": "garbage"})
    assert not v6["promoted"] and v6["decision"].endswith("no like-for-like comparison was made")  # no crash
    assert registry.diff("topics", 2, 6)["like_for_like"] is None
    (tmp / "new6.jsonl").write_text('{"text": "new6", "label": "x"}\n')
    section = compared(2, 0.9, 0.75)
    section["on_this_test"]["left_out"] = 3
    v7 = finished(reg, "j7", 0.90, test="new6.jsonl", champion=section)
    assert "(20 rows, both models scored; 3 left out that v2 trained on)" in v7["decision"], v7["decision"]
    assert registry.aliases("topics") == {"champion": 7}
    d = registry.diff("topics", 1, 2)  # the own figures are of other rows; the like-for-like ones come beside them
    assert not d["same_test_data"] and d["like_for_like"] == {"split": "v2's test split", "rows": 20,
                                                              "a": {"accuracy": 0.7}, "b": {"accuracy": 0.85}}
    assert registry.diff("topics", 2, 1)["like_for_like"]["a"] == {"accuracy": 0.85}


def test_champion_for_names_the_champions_folders_for_a_starting_job(reg):
    registry, tmp = reg
    store = registry.store
    finished(reg, "j1", 0.80)
    text = RECIPE.format(train=tmp / "train.jsonl", test=tmp / "test.jsonl", gain=0.0)
    store.add_job("j9", "topics", text, str(tmp / "j9"), 1, 1, 0)
    assert registry.champion_for(store.get("j9")) == {
        "model": "topics", "version": 1, "job_id": "j1", "model_dir": str(tmp / "j1" / "model"),
        "prepared": str(tmp / "j1" / "prepared")}
    store.add_job("plain", "plain", "name: plain\nmodel:\n  name: m\ntask: classification\ndata:\n  train: t\n",
                  str(tmp), 1, 1, 0)
    assert registry.champion_for(store.get("plain")) is None


def _report(parity: bool, shipped: dict, quality: bool | None) -> dict:
    checks = {"fp32_parity": {"passed": parity}}
    if quality is not None:
        checks["quantized_quality"] = {"passed": quality}
    return {"passed": True, "checks": checks, "shipped": shipped}


FP32 = {"variant": "fp32", "quantized": False, "note": "no quantized model met export.max_quality_drop"}
KEPT = {"variant": "int8_dynamic, 2 MatMuls kept in fp32", "quantized": True, "note": None}


@pytest.mark.parametrize("report,passed,variant", [
    (_report(True, FP32, None), True, "fp32"),  # the fp32 model ships: its parity is its bound
    (_report(True, KEPT, True), True, "int8_dynamic, 2 MatMuls kept in fp32"),
    (_report(True, KEPT, False), False, "int8_dynamic, 2 MatMuls kept in fp32"),  # shipped, yet missed its bound
    (_report(False, FP32, None), False, "fp32"),  # a report that says passed over a failed parity
    (_report(True, {"variant": ["x"], "quantized": "yes"}, None), True, None),  # junk types: no variant, not int8
    ({"passed": True}, False, None),  # no parity check at all: a report the runner does not write
])
def test_the_gate_counts_an_export_by_its_parity_and_the_variant_it_ships(reg, report, passed, variant):
    v = finished(reg, "j1", 0.9, report=report)
    assert v["export"]["passed"] is passed and v["export"]["variant"] == variant
    assert v["promoted"] is passed
    if not passed:
        assert v["decision"] == "not promoted: its export checks failed"
