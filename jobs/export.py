"""Export a finished job's model to ONNX, quantize it, and prove both against the PyTorch model.

    python -m jobs.export JOB_DIR [--quantize KIND] [--opset N] [--out DIR]   re-export without retraining

Running an export the way the checks do is jobs/export_checks.py; predicting with one is jobs/predict.py.

The driver calls `export_job` after training when the recipe asks for `export.onnx`. Everything is written into
`<out>.tmp/` and renamed to `<out>/` only when every check passed; a failed export is renamed to `<out>.failed/`,
kept for inspection, and its reason fails the job. So `<out>/` never holds stale or unchecked files.

Checks that gate the job:
- ONNX fp32 against PyTorch on held-out padded batches: max |logit difference| <= 1e-3 and identical predictions;
- the quantized model against PyTorch on the test split, by the task's metric, within `export.max_quality_drop`;
- causal LM: greedy generation with the fp32 ONNX model and its KV cache gives the tokens of `generate`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from jobs.export_checks import (
    FP32_ATOL, GENERATE_PROMPTS, GENERATE_TOKENS, METRIC_ROWS, PARITY_ROWS, QUALITY_DEFAULT, Runner, batch_arrays,
    eos_ids, latencies_ms, ort_generate, parity, past_names, prompts, quality_check, score, session, table,
)
from jobs.jobdir import first_line
from jobs.recipe import SNAPSHOT, load_recipe
from jobs.schema import ExportSpec, Recipe

TEMPLATES = Path(__file__).parent / "templates"


class ExportFailed(Exception):
    """The export or one of its checks failed; the message says which and by how much."""


# ----------------------------------------------------------------------------------------------------------------
# What is exported: plain (input_ids, attention_mask) -> logits, or a causal LM step with its KV cache
# ----------------------------------------------------------------------------------------------------------------


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


class _WithPast(torch.nn.Module):
    """(input_ids, attention_mask [b, past+new], position_ids, past k0, v0, k1, ...) -> (logits, present k0, ...)."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.m, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.m.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def kv_layout(model) -> dict:
    """Layers, KV heads and head size of a causal LM's cache, read from one forward pass."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, head_dim = layers[0].keys.shape
    return {"layers": len(layers), "kv_heads": int(heads), "head_dim": int(head_dim)}


def export_onnx(model, task: str, path: Path, opset: int, pad_id: int) -> dict | None:
    """Write path (+ path.data). Returns the KV layout for a causal LM. Samples use sizes >= 2 on every dynamic
    axis: torch.export specialises dimensions of size 0 or 1."""
    import logging

    from torch.export import Dim

    # the exporter warns, once per operator it could translate, that torchvision (detection ops) is absent: noise
    # in a job's log that reads like a failure
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    max_pos = int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048))
    batch, seq = Dim("batch", max=1024), Dim("sequence", max=max_pos)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad_id, pad_id]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    if task != "causal_lm":
        torch.onnx.export(_Logits(model).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                          dynamo=True, opset_version=opset, external_data=True, verbose=False)
        return None
    kv = kv_layout(model)
    with torch.no_grad():
        prefix = model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True).past_key_values
    past = [t for layer in prefix.layers for t in (layer.keys, layer.values)]
    new = torch.tensor([[11, 12], [13, 14]])
    past_len, total = Dim("past", max=max_pos), Dim("total", max=2 * max_pos)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    names = past_names(kv)
    torch.onnx.export(_WithPast(model, kv["layers"]).eval(),
                      (new, torch.ones(2, 5, dtype=torch.long), torch.tensor([[3, 4], [3, 4]]), *past), str(path),
                      input_names=["input_ids", "attention_mask", "position_ids", *names],
                      output_names=["logits", *[n.replace("past_key_values", "present") for n in names]],
                      dynamic_shapes=shapes, dynamo=True, opset_version=opset, external_data=True, verbose=False)
    return kv


# ----------------------------------------------------------------------------------------------------------------
# Quantization (onnxruntime)
# ----------------------------------------------------------------------------------------------------------------


def quantize(fp32: Path, out: Path, kind: str, calibration: list[dict] | None = None) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    _remove(out)
    if kind == "int4_weight_only":
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)

        level = logging.getLogger().level
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=True, accuracy_level=4))
        q.process()
        logging.getLogger().setLevel(level)  # the quantizer turns INFO logging on, a line per node
        q.model.save_model_to_file(str(out), use_external_data_format=True)
        return
    pre = out.with_name(out.stem + ".pre.onnx")
    _remove(pre)
    # dynamo graphs defeat symbolic shape inference; external data in one file, not one per tensor
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    try:
        if kind == "int8_dynamic":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=True)
        else:
            from onnxruntime.quantization import CalibrationDataReader

            class Reader(CalibrationDataReader):
                def __init__(self, feeds):
                    self.it = iter(feeds)

                def get_next(self):
                    return next(self.it, None)

            # MatMul only: full-graph static int8 broke a BERT classifier (ARCHITECTURE.md, Decisions)
            quantize_static(str(pre), str(out), Reader(calibration or []), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, use_external_data_format=True)
    finally:
        _remove(pre)


def _remove(onnx_path: Path) -> None:
    """ORT's writers append to an existing .data file: remove both before writing."""
    onnx_path.unlink(missing_ok=True)
    onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)


def onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ----------------------------------------------------------------------------------------------------------------
# The job's export
# ----------------------------------------------------------------------------------------------------------------


def export_job(job_dir: Path, recipe: Recipe, out: Path | None = None, threads: int = 2, repeats: int = 10,
               log=print) -> dict:
    """Export job_dir/model into out (default job_dir/onnx), check it, write export_report.json. Raises
    ExportFailed with the reason after keeping the files in <out>.failed/."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    job_dir = Path(job_dir)
    out = Path(out) if out else job_dir / "onnx"
    spec, task = recipe.export, recipe.task
    kind = spec.quantize
    tmp = out.with_name(out.name + ".tmp")
    failed_dir = out.with_name(out.name + ".failed")
    for d in (tmp, failed_dir):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()

    model_dir = job_dir / "model"
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).float().eval()  # bf16 does not run on ORT CPU
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = datasets.load_from_disk(str(job_dir / "prepared" / "data"))
    held_out = data["test"] if len(data["test"]) else data["validation"]
    rows = [held_out[i] for i in range(min(len(held_out), METRIC_ROWS))]
    report: dict = {"task": task, "quantize": kind, "opset": spec.opset, "threads": threads, "passed": False,
                    "checks": {}, "variants": {}}
    try:
        fp32 = tmp / "model.onnx"
        kv = _export_fp32(model, task, fp32, spec.opset, pad_id, report, log)
        torch_run, fp32_run = Runner(task, kv, model=model), Runner(task, kv, sess=session(fp32, threads))
        _check_fp32(torch_run, fp32_run, rows, pad_id, task, report)
        if task == "causal_lm":
            _check_generation(model, fp32_run, kv, rows, pad_id, report)
        qpath = tmp / "model.quantized.onnx"
        if kind != "none":
            calibration = _calibration(job_dir, data, spec.calibration_samples, pad_id, task, kv, recipe.train.seed) \
                if kind == "int8_static" else None
            _quantize(fp32, qpath, kind, calibration, report, log)
        variants = {"pytorch_fp32": (torch_run, sum(p.numel() * 4 for p in model.parameters())),
                    "onnx_fp32": (fp32_run, onnx_bytes(fp32))}
        if kind != "none":
            variants[f"onnx_{kind}"] = (Runner(task, kv, sess=session(qpath, threads)), onnx_bytes(qpath))
        _measure(variants, rows, pad_id, task, repeats, report)
        if kind != "none":
            bound = spec.max_quality_drop if spec.max_quality_drop is not None else QUALITY_DEFAULT[task]
            _check_quality(task, kind, bound, len(rows), report)
    except ExportFailed as e:
        report["failure"] = str(e)
        _finish(tmp, failed_dir, report)
        raise ExportFailed(f"export: {e}; the files are kept in {failed_dir}") from None

    tok.save_pretrained(tmp)
    if (model_dir / "labels.json").exists():
        shutil.copy(model_dir / "labels.json", tmp / "labels.json")
    (tmp / "export.json").write_text(json.dumps({"task": task, "quantize": kind, "pad_token_id": pad_id,
                                                 "kv": kv, "eos": sorted(eos_ids(model)) if kv else None}, indent=2))
    (tmp / "README.md").write_text(readme(task, kind))
    report["passed"] = True
    report["total_s"] = round(time.perf_counter() - t_start, 2)
    _finish(tmp, out, report)
    for line in table(report):
        log(line)
    return report


def _export_fp32(model, task: str, fp32: Path, opset: int, pad_id: int, report: dict, log) -> dict | None:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # the exporter's notes on axis names and pytree specs are not the user's
            warnings.simplefilter("ignore")
            kv = export_onnx(model, task, fp32, opset, pad_id)
    except Exception as e:  # noqa: BLE001 - the exporter's own words are the reason
        raise ExportFailed(f"torch.onnx.export failed: {first_line(e, 400)}") from None
    report["export_s"] = round(time.perf_counter() - t0, 2)
    log(f"export: ONNX fp32 written ({onnx_bytes(fp32) / 1e6:.1f} MB, {report['export_s']:.1f} s)")
    return kv


def _check_fp32(torch_run: Runner, fp32_run: Runner, rows: list[dict], pad_id: int, task: str, report: dict) -> None:
    p = parity(torch_run, fp32_run, rows[:PARITY_ROWS], pad_id, task)
    p["passed"] = p["max_abs_diff"] <= FP32_ATOL and p["prediction_mismatches"] == 0
    report["checks"]["fp32_parity"] = p
    if not p["passed"]:
        raise ExportFailed(f"ONNX fp32 differs from PyTorch on {p['rows']} held-out rows: max |logit difference| "
                           f"{p['max_abs_diff']:.2e} (allowed {FP32_ATOL:g}), {p['prediction_mismatches']} "
                           f"different predictions")


def _check_generation(model, fp32_run: Runner, kv: dict, rows: list[dict], pad_id: int, report: dict) -> None:
    """Greedy generation with the fp32 ONNX model and its KV cache gives the tokens of `generate`."""
    eos = eos_ids(model)
    cases = []
    for prompt in prompts(rows, GENERATE_PROMPTS):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=pad_id)
        want = ref[0, len(prompt):].tolist()
        got = ort_generate(fp32_run.sess, kv, prompt, len(want), eos)
        cases.append({"prompt_tokens": len(prompt), "torch": want, "onnx": got})
    same = all(c["torch"] == c["onnx"] for c in cases)
    report["checks"]["generation"] = {"passed": same, "cases": cases}
    if not same:
        bad = next(c for c in cases if c["torch"] != c["onnx"])
        raise ExportFailed(f"greedy generation with the ONNX model and its KV cache gives {bad['onnx']}, generate "
                           f"gives {bad['torch']}")


def _quantize(fp32: Path, qpath: Path, kind: str, calibration, report: dict, log) -> None:
    t0 = time.perf_counter()
    try:
        quantize(fp32, qpath, kind, calibration)
    except Exception as e:  # noqa: BLE001
        raise ExportFailed(f"{kind} quantization failed: {first_line(e, 400)}") from None
    report["quantize_s"] = round(time.perf_counter() - t0, 2)
    log(f"export: {kind} written ({onnx_bytes(qpath) / 1e6:.1f} MB, {report['quantize_s']:.1f} s)")


def _measure(variants: dict, rows: list[dict], pad_id: int, task: str, repeats: int, report: dict) -> None:
    """Each variant's size, the task's metric on the test rows, and its latency at batch 1 and 8."""
    runs = {name: run for name, (run, _) in variants.items()}
    b1 = latencies_ms(runs, rows, pad_id, 1, repeats)
    b8 = latencies_ms(runs, rows, pad_id, 8, repeats)
    for name, (run, size) in variants.items():
        report["variants"][name] = {"bytes": size, **score(run, rows, pad_id, task),
                                    "latency_ms_b1": round(b1[name], 3), "latency_ms_b8": round(b8[name], 3)}


def _check_quality(task: str, kind: str, bound: float, n_rows: int, report: dict) -> None:
    what, figure, ok = quality_check(task, bound, report["variants"]["pytorch_fp32"], report["variants"][f"onnx_{kind}"])
    report["checks"]["quantized_quality"] = {"compared": what, "value": figure, "bound": bound, "passed": ok,
                                             "rows": n_rows}
    if not ok:
        raise ExportFailed(f"the {kind} model is worse than PyTorch on {n_rows} test rows: {what} {figure:.4g}, "
                           f"allowed {bound:g} (export.max_quality_drop)")


def _finish(tmp: Path, final: Path, report: dict) -> None:
    (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _calibration(job_dir: Path, data, n: int, pad_id: int, task: str, kv, seed: int) -> list[dict]:
    import random

    train = data["train"]
    pick = random.Random(seed).sample(range(len(train)), min(n, len(train)))
    feeds = []
    for i in pick:
        ids, mask = batch_arrays([train[i]], pad_id)
        feed = {"input_ids": ids, "attention_mask": mask}
        if task == "causal_lm":
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            feed.update({n: np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), dtype=np.float32)
                         for n in past_names(kv)})
        feeds.append(feed)
    return feeds


def readme(task: str, kind: str) -> str:
    """The export folder's README.md: what each file is, and how to run it with onnxruntime alone."""
    use = (TEMPLATES / ("use_causal_lm.md" if task == "causal_lm" else "use_encoder.md")).read_text(encoding="utf-8")
    if task != "causal_lm":
        use += ('labels = json.load(open("labels.json"))\nprint([labels[i] for i in logits.argmax(-1)])\n'
                if task == "classification" else "print(logits[:, 0])   # the predicted values\n")
    extra = ", plus `position_ids` and the KV cache for a causal LM" if task == "causal_lm" else ""
    model = "model.quantized.onnx" if kind != "none" else "model.onnx"
    return (TEMPLATES / "onnx_README.md").read_text(encoding="utf-8").format(
        kind=kind, inputs_extra=extra, use=use.replace("{model}", model).rstrip("\n") + "\n```")


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ap = argparse.ArgumentParser(prog="python -m jobs.export")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("--quantize", choices=["none", "int8_dynamic", "int8_static", "int4_weight_only"])
    ap.add_argument("--opset", type=int)
    ap.add_argument("--max-quality-drop", type=float)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    job_dir = a.job_dir.resolve()
    recipe = load_recipe(job_dir / "recipe.yaml", allowed=SNAPSHOT)
    changes = {k: v for k, v in {"onnx": True, "quantize": a.quantize, "opset": a.opset,
                                 "max_quality_drop": a.max_quality_drop}.items() if v is not None}
    recipe = recipe.model_copy(update={"export": ExportSpec(**{**recipe.export.model_dump(), **changes})})
    out = a.out or job_dir / "exports" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{recipe.export.quantize}"
    try:
        report = export_job(job_dir, recipe, out, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ExportFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"export_dir": str(out), "passed": report["passed"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
