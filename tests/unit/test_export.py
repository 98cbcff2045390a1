"""ONNX export, quantization and the checks that gate a job, on tiny models built from config (no Ray, no hub).

Each job folder is laid out as training leaves it: model/ (merged weights, tokenizer, labels.json), prepared/
(the tokenized splits, written by jobs.driver.prepare_data) and recipe.yaml.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobdirs import make_job, trained_classifier, with_export
from jobs.export import ExportFailed, export_job
from jobs.export_checks import batch_arrays, quality_check, session
from jobs.onnx_fusion import fuse, op_counts
from jobs.predict import predict
from jobs.jobdir import latest_export
from tiny import keyword_rows, tiny_model_dir


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    """A tiny BERT classifier trained in-process until it tells 'good' from 'bad' (so accuracy means something)."""
    return trained_classifier(tmp_path_factory.mktemp("clf") / "model", tokenizer)


def test_classifier_export_passes_checks_and_reports(tmp_path, classifier_dir):
    job, recipe = make_job(tmp_path, classifier_dir, "classification", keyword_rows(200, seed=3))
    report = export_job(job, with_export(recipe, quantize="int8_dynamic"), log=lambda m: None, repeats=3)
    out = job / "onnx"
    saved = json.loads((out / "export_report.json").read_text())
    assert saved == json.loads(json.dumps(report)) and report["passed"]
    parity = report["checks"]["fp32_parity"]
    assert parity["max_abs_diff"] <= 1e-3 and parity["prediction_mismatches"] == 0 and parity["rows"] > 8
    v = report["variants"]
    assert set(v) == {"pytorch_fp32", "onnx_fp32", "onnx_fp32_unfused", "onnx_int8_dynamic"}
    assert v["pytorch_fp32"]["accuracy"] >= 0.9, "the fixture learned the task"
    assert v["onnx_fp32"]["accuracy"] == v["onnx_fp32_unfused"]["accuracy"] == v["pytorch_fp32"]["accuracy"]
    # every held-out row is scored: all of the prepared test and validation splits
    import datasets

    data = datasets.load_from_disk(str(job / "prepared" / "data"))
    n = len(data["test"]) + len(data["validation"])
    assert report["held_out_rows"] == {"test": len(data["test"]), "validation": len(data["validation"])}
    assert n > len(data["test"]) > 10 and v["pytorch_fp32"]["examples"] == n
    q = report["checks"]["quantized_quality"]
    assert q["value"] <= 1.0 and q["low"] <= q["value"] <= q["high"] and q["rows"] == n
    assert v["onnx_int8_dynamic"]["bytes"] < v["onnx_fp32"]["bytes"]
    assert all(x["latency_ms_b1"] > 0 and x["latency_ms_b8"] > 0 for x in v.values())
    assert report["shipped"] == {"variant": "int8_dynamic", "file": "model.quantized.onnx", "quantized": True,
                                 "kind": "int8_dynamic", "kept_fp32": [], "note": None}
    assert [a["variant"] for a in report["attempts"]] == ["onnx_int8_dynamic"], "it passed: nothing else tried"
    for f in ("model.onnx", "model.onnx.data", "model.quantized.onnx", "tokenizer.json", "labels.json", "README.md"):
        assert (out / f).exists(), f
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx", "model.quantized.onnx"], "no scratch graphs"
    assert not (job / "onnx.tmp").exists() and not (job / "onnx.failed").exists()

    # the optimisation stage: the shipped fp32 graph is the fused one, and it is PyTorch's model within 1e-3
    opt = report["optimize"]
    assert opt["used"] and opt["reason"] is None
    assert opt["fused_ops"]["MultiHeadAttention"] == 2 and opt["fused_ops"]["BiasGelu"] == 2
    assert opt["fusions"]["packed_qkv"] == 2 and opt["ops"]["Split"] == 2, "Q, K and V: one MatMul per layer"
    # SkipLayerNormalization is left out (its CPU kernel is slower than its parts), in the file and in the
    # graph onnxruntime runs: the optimised graph a session with export.json's options writes back
    assert "SkipLayerNormalization" not in opt["ops"] and opt["ops"]["LayerNormalization"] >= 4
    import onnxruntime as ort

    meta = json.loads((out / "export.json").read_text())
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    ort.InferenceSession(str(out / "model.quantized.onnx"), so, **meta["session_options"])
    assert "SkipLayerNormalization" not in op_counts(tmp_path / "as_run.onnx")
    so.optimized_model_filepath = str(tmp_path / "default.onnx")
    ort.InferenceSession(str(out / "model.quantized.onnx"), so)
    assert "SkipLayerNormalization" in op_counts(tmp_path / "default.onnx"), "what the options prevent"
    assert opt["parity"]["max_abs_diff"] <= 1e-3 and opt["parity"]["prediction_mismatches"] == 0
    assert op_counts(out / "model.onnx").get("MultiHeadAttention") == 2
    assert "MultiHeadAttention" not in opt["ops_unfused"]
    ids, mask = batch_arrays([{"input_ids": [2, 7, 9, 11, 4]}, {"input_ids": [3, 5]}], 0)
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        want = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = session(out / "model.onnx", 1).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    assert np.abs(got - want).max() <= 1e-3

    # the exported model alone (onnxruntime + tokenizer) labels new texts as the PyTorch model does
    got = predict(out, ["apple good river stone", "bad cloud window music"])
    assert [g["label"] for g in got] == ["pos", "neg"]
    assert abs(sum(got[0]["scores"].values()) - 1) < 1e-3
    readme = (out / "README.md").read_text()
    assert "int8_dynamic" in readme
    # the README's own example, run as a user would, in the folder, with onnxruntime and the tokenizer alone
    import subprocess
    import sys

    code = readme.split("```python\n")[1].split("```")[0]
    ran = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().startswith("[") and ("pos" in ran.stdout or "neg" in ran.stdout)


def _break_head(src: Path, dst: Path) -> None:
    """One huge weight per output row of the head: fp32 is unchanged (the same constant on every logit), but
    int8 per-channel scales then round every other weight of the head to zero, and all inputs get one label."""
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(src, dst)
    model = AutoModelForSequenceClassification.from_pretrained(dst)
    with torch.no_grad():
        model.bert.pooler.dense.weight[0].zero_()
        model.bert.pooler.dense.bias[0] = 5.0  # pooled feature 0 = tanh(5): the same for every input
        model.classifier.weight[:, 0] = 500.0
    model.save_pretrained(dst)


def test_a_quantization_that_breaks_one_layer_recovers_by_keeping_it_in_fp32(tmp_path, classifier_dir):
    import onnx

    broken = tmp_path / "broken"
    _break_head(classifier_dir, broken)
    job, recipe = make_job(tmp_path, broken, "classification", keyword_rows(200, seed=3))
    report = export_job(job, with_export(recipe, quantize="int8_dynamic"), log=lambda m: None, repeats=1)
    first, *rest = report["attempts"]
    assert first["variant"] == "onnx_int8_dynamic" and not first["passed"]
    assert first["accuracy"] <= 0.6 and first["quality"]["value"] > 30, "int8 of the head gives one label"
    # the sensitivity ranks the head first; an independent check: the node's weight is the head's [hidden, labels]
    top = report["sensitivity"][0]["node"]
    graph = onnx.load(str(job / "onnx" / "model.onnx"), load_external_data=False).graph
    fp32_nodes = {n.name: n for n in graph.node}
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    assert sorted(shapes[fp32_nodes[top].input[1]]) == [2, 32], "the classifier's weight (a Gemm's is [out, in])"
    assert report["sensitivity"][0]["score"] > 10 * report["sensitivity"][1]["score"]
    keep1 = next(a for a in rest if a["variant"] == "onnx_int8_dynamic_keep1")
    assert keep1["passed"] and keep1["kept_fp32"] == [top] and keep1["quality"]["value"] <= 1.0
    shipped = report["shipped"]
    assert shipped["quantized"] and shipped["file"] == "model.quantized.onnx"
    assert report["checks"]["quantized_quality"]["passed"] and report["passed"]
    chosen = next(a for a in report["attempts"] if a["description"] == shipped["variant"])
    assert chosen["latency_ms_b8"] == min(a["latency_ms_b8"] for a in report["attempts"] if a["passed"])
    # what ships: the head's MatMul is fp32 (a MatMul, not MatMulInteger), the rest int8, and it labels correctly
    q = onnx.load(str(job / "onnx" / "model.quantized.onnx"), load_external_data=False).graph
    assert any(n.op_type in ("MatMulInteger", "QuantizeLinear") for n in q.node), "int8 (dynamic or static)"
    if shipped["variant"].startswith("int8_dynamic"):
        assert any(n.name in (top, top + "_MatMul") and n.op_type in ("MatMul", "Gemm") for n in q.node)
    assert json.loads((job / "onnx" / "export.json").read_text())["model_file"] == "model.quantized.onnx"
    assert [g["label"] for g in predict(job / "onnx", ["apple good river", "bad cloud stone"])] == ["pos", "neg"]


def _break_every_layer(src: Path, dst: Path) -> None:
    """A huge weight in every output channel of every Linear, each reading an input that is always exactly 0, so
    fp32 computes what it did before but int8's per-channel scales round every other weight to zero everywhere."""
    from transformers import AutoModelForSequenceClassification

    _break_head(src, dst)
    model = AutoModelForSequenceClassification.from_pretrained(dst)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for ln in (model.bert.embeddings.LayerNorm, layer.attention.output.LayerNorm):
                ln.weight[0], ln.bias[0] = 0.0, 0.0  # hidden feature 0 of what Q, K, V and the FFN read is 0
            layer.output.LayerNorm.weight[0], layer.output.LayerNorm.bias[0] = 0.0, 0.0
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                        layer.intermediate.dense):
                lin.weight[:, 0] = 500.0
            v = layer.attention.self.value
            v.weight[1].zero_()
            v.bias[1] = 0.0  # value feature 1 is 0, so is the context's: the attention output reads it
            layer.attention.output.dense.weight[:, 1] = 500.0
            layer.intermediate.dense.weight[1].zero_()
            layer.intermediate.dense.bias[1] = 0.0  # GELU(0) = 0: the FFN output reads it
            layer.output.dense.weight[:, 1] = 500.0
        model.bert.pooler.dense.weight[1:, 0] = 500.0
    model.save_pretrained(dst)


def test_a_model_no_quantization_can_save_ships_fp32_or_fails_when_required(tmp_path, classifier_dir):
    broken = tmp_path / "broken"
    _break_every_layer(classifier_dir, broken)
    job, recipe = make_job(tmp_path, broken, "classification", keyword_rows(200, seed=3))
    notes: list[str] = []
    report = export_job(job, with_export(recipe, quantize="int8_dynamic"), log=notes.append, repeats=1)
    assert report["passed"] and report["variants"]["onnx_fp32"]["accuracy"] >= 0.8, "fp32 still works"
    tried = [a["variant"] for a in report["attempts"]]
    assert tried[0] == "onnx_int8_dynamic" and "onnx_int8_dynamic_keep1" in tried and tried[-1] == "onnx_int8_static"
    assert not any(a["passed"] for a in report["attempts"])
    shipped = report["shipped"]
    assert shipped["quantized"] is False and shipped["file"] == "model.onnx" and shipped["variant"] == "fp32"
    assert shipped["note"].startswith("no quantized model met export.max_quality_drop (1)")
    assert "the checked fp32 ONNX model is shipped" in shipped["note"]
    assert "int8_static: accuracy drop" in shipped["note"]
    assert any(shipped["note"] in n for n in notes), "the job's log says it too"
    out = job / "onnx"
    assert not (out / "model.quantized.onnx").exists() and "quantized_quality" not in report["checks"]
    assert json.loads((out / "export.json").read_text())["model_file"] == "model.onnx"
    assert "There is no quantized model: no quantized model met" in (out / "README.md").read_text()
    assert latest_export(job) == out
    assert [g["label"] for g in predict(out, ["apple good river", "bad cloud stone"])] == ["pos", "neg"]

    with pytest.raises(ExportFailed) as e:
        export_job(job, with_export(recipe, quantize="int8_dynamic", require_quantized=True), log=lambda m: None,
                   repeats=1)
    assert "no quantized model met export.max_quality_drop (1)" in str(e.value)
    assert "export.require_quantized is true" in str(e.value)
    failed = job / "onnx.failed"
    assert json.loads((failed / "export_report.json").read_text())["failure"].startswith("no quantized model met")
    assert not (job / "onnx").exists(), "the earlier export of this model is replaced, not left for predict to find"
    assert sorted(p.name for p in failed.glob("*.onnx")) == ["model.onnx"], "no copies of the model per try"


def _negate_a_weight(model):
    """A fusion that 'works' but computes something else: the real fusion, then one weight's sign flipped."""
    counts = fuse(model)
    value = next(v for v in model.graph.initializers.values()
                 if v.const_value is not None and v.const_value.numpy().ndim == 2)
    import onnx_ir as ir

    value.const_value = ir.tensor(-value.const_value.numpy())
    return counts


def _raise(model):
    raise RuntimeError("pattern matcher blew up")


@pytest.mark.parametrize("fuse_fn,reason", [(_negate_a_weight, "the fused graph differs from PyTorch on"),
                                            (_raise, "the fusion failed: RuntimeError: pattern matcher blew up")])
def test_a_broken_fusion_falls_back_to_the_unfused_graph_with_the_reason(tmp_path, classifier_dir, fuse_fn, reason):
    job, recipe = make_job(tmp_path, classifier_dir, "classification", keyword_rows(120, seed=4))
    notes: list[str] = []
    report = export_job(job, with_export(recipe, quantize="int8_dynamic"), log=notes.append, repeats=1,
                        fuse_fn=fuse_fn)
    opt = report["optimize"]
    assert report["passed"] and opt["used"] is False and opt["reason"].startswith(reason)
    assert any("the unfused graph is used: " + reason in n for n in notes)
    assert "onnx_fp32_unfused" not in report["variants"]
    assert "MultiHeadAttention" not in op_counts(job / "onnx" / "model.onnx")
    assert not list((job / "onnx").glob("model.fused*")), "the rejected graph is not left beside the shipped one"
    assert report["checks"]["fp32_parity"]["max_abs_diff"] <= 1e-3


def test_the_quality_interval_against_a_hand_computation():
    import math
    import statistics

    # classification: per-row correct (1/0); the drop is mean(reference - quantized) in points
    ref, q = np.array([1, 1, 1, 0, 1, 1.0]), np.array([1, 0, 1, 1, 0, 1.0])
    got = quality_check("classification", 1.0, ref, q)
    d = [1 - 1, 1 - 0, 1 - 1, 0 - 1, 1 - 0, 1 - 1]
    half = 1.959964 * statistics.stdev(d) / math.sqrt(6)
    assert got["value"] == pytest.approx(100 * 1 / 6) and not got["passed"]
    assert got["low"] == pytest.approx(100 * (1 / 6 - half)) and got["high"] == pytest.approx(100 * (1 / 6 + half))
    # regression: the ratio of summed squared errors, its interval the delta method's for a ratio of sums
    ref, q = np.array([1.0, 2.0, 3.0, 2.0]), np.array([1.5, 2.0, 3.5, 2.0])
    got = quality_check("regression", 1.1, ref, q)
    r = 9 / 8
    half = 1.959964 * statistics.stdev([1.5 - r * 1, 2 - r * 2, 3.5 - r * 3, 2 - r * 2]) * math.sqrt(4) / 8
    assert got["value"] == pytest.approx(r) and got["low"] == pytest.approx(r - half)
    assert got["high"] == pytest.approx(r + half)
    assert not got["passed"] and quality_check("regression", 1.2, ref, q)["passed"]
    # causal LM: [summed nll, tokens] per row; the ratio of perplexities is exp(extra nll per token)
    ref, q = np.array([[4.0, 4], [6.0, 6]]), np.array([[4.4, 4], [6.0, 6]])
    got = quality_check("causal_lm", 1.05, ref, q)
    assert got["value"] == pytest.approx(math.exp(0.4 / 10))
    half = 1.959964 * statistics.stdev([0.4 - 0.04 * 4, 0.0 - 0.04 * 6]) * math.sqrt(2) / 10
    assert got["high"] == pytest.approx(math.exp(0.04 + half)) and got["low"] == pytest.approx(math.exp(0.04 - half))
    assert got["passed"]
    with pytest.raises(ValueError):
        quality_check("classification", 1.0, np.array([]), np.array([]))


def test_the_sensitivity_rounds_activations_as_onnxruntime_does():
    """The simulated rounding against onnxruntime's own DynamicQuantizeLinear -> DequantizeLinear."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from jobs.quantize import _round_activations

    g = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=(8, 16)), rng.normal(size=(4, 4)) + 3, np.abs(rng.normal(size=(5, 3))) * -2):
        x = x.astype(np.float32)
        want = sess.run(["y"], {"x": x})[0]
        assert np.abs(_round_activations(x) - want).max() <= 1e-5 * max(1.0, float(np.abs(x).max()))
    assert onnx  # imported for the helper above


def test_impossibly_strict_bound_fails_and_reexport_never_mixes_files(tmp_path, tokenizer):
    model_dir = tiny_model_dir(tmp_path / "gpt2", "gpt2", tokenizer, weights=True)
    rows = [{"text": " ".join(r["text"].split() * 3)} for r in keyword_rows(80)]
    job, recipe = make_job(tmp_path, model_dir, "causal_lm", rows)
    # a ratio of 0.5: int8 can come out a hair better than fp32 on a model this small, so only a bound below 1
    # fails every time
    with pytest.raises(ExportFailed) as e:
        export_job(job, with_export(recipe, quantize="int8_dynamic", max_quality_drop=0.5, require_quantized=True),
                   log=lambda m: None, repeats=1)
    assert "no quantized model met export.max_quality_drop (0.5)" in str(e.value)
    assert "int8_dynamic: perplexity ratio" in str(e.value)
    # a first export that passes, then a second one into the same folder with other settings
    export_job(job, with_export(recipe, quantize="int8_dynamic"), log=lambda m: None, repeats=1)
    assert not (job / "onnx.failed").exists(), "a later success clears the failed attempt"
    first = sorted(p.name for p in (job / "onnx").iterdir())
    report = export_job(job, with_export(recipe, quantize="none"), log=lambda m: None, repeats=1)
    second = sorted(p.name for p in (job / "onnx").iterdir())
    assert "model.quantized.onnx" in first and "model.quantized.onnx" not in second
    assert set(report["variants"]) == {"pytorch_fp32", "onnx_fp32"}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_generation_parity_with_kv_cache(tmp_path, tokenizer, kind):
    import onnxruntime as ort

    model_dir = tiny_model_dir(tmp_path / kind, kind, tokenizer, weights=True)
    rows = [{"instruction": f"say {r['text']}", "output": r["label"]} for r in keyword_rows(100)]
    job, recipe = make_job(tmp_path, model_dir, "causal_lm", rows, "  format: instruction\n")
    report = export_job(job, with_export(recipe, quantize="int8_dynamic"), log=lambda m: None, repeats=1)
    gen = report["checks"]["generation"]
    assert gen["passed"] and len(gen["cases"]) == 3
    assert all(len(c["torch"]) >= 1 and c["torch"] == c["onnx"] for c in gen["cases"])
    assert report["checks"]["fp32_parity"]["max_abs_diff"] <= 1e-3
    q = report["variants"]["onnx_int8_dynamic"]
    assert q["perplexity"] / report["variants"]["pytorch_fp32"]["perplexity"] <= 1.05
    sess = ort.InferenceSession(str(job / "onnx" / "model.onnx"))
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    assert "present.1.value" in [o.name for o in sess.get_outputs()]
    out = predict(job / "onnx", ["say apple good"], new_tokens=4)
    assert isinstance(out[0]["generated"], str)


def test_static_and_int4_quantization(tmp_path, tokenizer):
    model_dir = tiny_model_dir(tmp_path / "llama", "llama", tokenizer, weights=True)
    rows = [{"text": " ".join(r["text"].split() * 2)} for r in keyword_rows(60)]
    job, recipe = make_job(tmp_path, model_dir, "causal_lm", rows)
    import onnx

    for kind, op in (("int8_static", "QuantizeLinear"), ("int4_weight_only", "MatMulNBits")):
        out = tmp_path / f"out-{kind}"
        report = export_job(job, with_export(recipe, quantize=kind, calibration_samples=8, max_quality_drop=2.0),
                            out=out, log=lambda m: None, repeats=1)
        ops = {n.op_type for n in onnx.load(str(out / "model.quantized.onnx"), load_external_data=False).graph.node}
        assert op in ops, (kind, sorted(ops))
        assert report["checks"]["quantized_quality"]["passed"]
    assert latest_export(job) is None, "exports outside the job folder are not the job's"


def test_regression_export(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification, BertConfig

    d = tmp_path / "reg"
    tiny_model_dir(d, "bert", tokenizer)
    cfg = BertConfig.from_pretrained(d)
    cfg.num_labels, cfg.problem_type = 1, "regression"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d)
    rows = [{"text": r["text"], "label": float(i % 5)} for i, r in enumerate(keyword_rows(80))]
    job, recipe = make_job(tmp_path, d, "regression", rows)
    report = export_job(job, with_export(recipe, quantize="int8_dynamic"), log=lambda m: None, repeats=1)
    assert report["checks"]["fp32_parity"]["max_abs_diff"] <= 1e-3
    assert report["checks"]["quantized_quality"]["compared"] == "mse ratio"
    v = predict(job / "onnx", ["apple good"])[0]["value"]
    assert np.isfinite(v)


def test_cli_reexport_predict_and_view(tmp_path, classifier_dir):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    job, recipe = make_job(tmp_path, classifier_dir, "classification", keyword_rows(120, seed=5))
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home")}

    def runner(*args):
        return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, env=env)

    out = runner("predict", str(job), "good apple")
    assert out.returncode == 2 and "has no ONNX export that passed its checks" in out.stderr
    out = runner("export", str(job), "--opset", "30")
    assert out.returncode == 2 and out.stderr.startswith("--opset: 30: Input should be less than or equal to 22")
    out = runner("export", str(job), "--quantize", "none", "--no-optimize")
    assert out.returncode == 0, out.stderr
    export_dir = Path(out.stdout.split("export: ")[1].split()[0])
    assert export_dir.parent == job / "exports" and export_dir.name.endswith("-none")
    report = json.loads((export_dir / "export_report.json").read_text())
    assert report["passed"] and report["quantize"] == "none" and not (export_dir / "model.quantized.onnx").exists()
    assert report["optimize"]["used"] is False and report["optimize"]["reason"] == "export.optimize is false"
    assert report["shipped"]["file"] == "model.onnx" and report["shipped"]["note"] is None, "fp32 as asked: no words"
    assert "onnx_fp32" in out.stderr and "pytorch_fp32" in out.stderr, "the size / speed / quality table"
    out = runner("predict", str(job), "bad stone road music", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[0])
    assert got["label"] == "neg" and set(got["scores"]) == {"neg", "pos"}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    view = subprocess.Popen([sys.executable, "-m", "runner.cli", "view", str(job), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = view.stdout.readline()
        assert line.startswith(f"Netron: http://127.0.0.1:{port}"), line + view.stderr.read()
        html = ""
        for _ in range(40):
            try:
                html = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.25)
        assert "netron" in html.lower()
    finally:
        view.send_signal(signal.SIGINT)
        view.wait(timeout=20)


def test_an_export_never_replaces_a_folder_that_is_not_an_export(tmp_path, classifier_dir):
    job, recipe = make_job(tmp_path, classifier_dir, "classification", keyword_rows(40, seed=6))
    before = sorted(p.name for p in (job / "model").iterdir())
    for out in (job / "model", job, tmp_path):
        with pytest.raises(ExportFailed) as e:
            export_job(job, with_export(recipe), out=out, log=lambda m: None, repeats=1)
        assert f"{out} is not an export folder (or holds the job)" in str(e.value)
    assert sorted(p.name for p in (job / "model").iterdir()) == before, "the model is untouched"
    assert not (job / "model.tmp").exists() and not (job / "model.failed").exists()
