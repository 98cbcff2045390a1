"""Export a finished job's model to ONNX, quantize it, and prove both against the PyTorch model.

    python -m jobs.export JOB_DIR [--quantize KIND] [--opset N] [--out DIR]   re-export without retraining
    python -m jobs.export predict JOB_DIR TEXT... [--json]                      run the exported model

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
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from jobs.jobdir import latest_export
from jobs.recipe import SNAPSHOT, load_recipe
from jobs.schema import ExportSpec, Recipe

FP32_ATOL = 1e-3
QUALITY_DEFAULT = {"classification": 1.0, "causal_lm": 1.05, "regression": 1.10}
PARITY_ROWS = 64  # held-out rows compared element-wise, fp32 ONNX against PyTorch
METRIC_ROWS = 1000  # test rows scored by each variant
GENERATE_PROMPTS, GENERATE_TOKENS = 3, 8


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


def past_names(kv: dict) -> list[str]:
    return [f"past_key_values.{i}.{x}" for i in range(kv["layers"]) for x in ("key", "value")]


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


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------------------
# Running the three variants the same way
# ----------------------------------------------------------------------------------------------------------------


def batch_arrays(rows: list[dict], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    return ids, mask


class Runner:
    """logits of a padded batch, from PyTorch or an ONNX session, for every task."""

    def __init__(self, task: str, kv: dict | None, model=None, sess=None):
        self.task, self.kv, self.model, self.sess = task, kv, model, sess

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.model is not None:
            with torch.no_grad():
                return self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                                  ).logits.float().numpy()
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.task == "causal_lm":
            b = ids.shape[0]
            feed["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
            empty = np.zeros((b, self.kv["kv_heads"], 0, self.kv["head_dim"]), dtype=np.float32)
            feed.update({n: empty for n in past_names(self.kv)})
        return self.sess.run(["logits"], feed)[0]


def score(run: Runner, rows: list[dict], pad_id: int, task: str, batch: int = 8) -> dict:
    """The task's metric over rows: accuracy, mse or perplexity (with the loss)."""
    correct, sq, nll, tokens = 0, 0.0, 0.0, 0
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        ids, mask = batch_arrays(part, pad_id)
        logits = run.logits(ids, mask).astype(np.float64)
        if task == "classification":
            correct += int((logits.argmax(-1) == np.array([r["labels"] for r in part])).sum())
        elif task == "regression":
            sq += float(((logits[:, 0] - np.array([float(r["labels"]) for r in part])) ** 2).sum())
        else:
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            for j, r in enumerate(part):
                for t in range(1, len(r["labels"])):
                    if r["labels"][t] != -100:
                        nll -= logp[j, t - 1, r["labels"][t]]
                        tokens += 1
    n = len(rows)
    if task == "classification":
        return {"accuracy": correct / n, "examples": n}
    if task == "regression":
        return {"mse": sq / n, "examples": n}
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "examples": n}


def parity(torch_run: Runner, onnx_run: Runner, rows: list[dict], pad_id: int, task: str) -> dict:
    """fp32 ONNX against PyTorch on padded batches: the largest logit difference (pads left out) and predictions."""
    max_diff, disagree, compared = 0.0, 0, 0
    for i in range(0, len(rows), 8):
        ids, mask = batch_arrays(rows[i:i + 8], pad_id)
        a, b = torch_run.logits(ids, mask), onnx_run.logits(ids, mask)
        if task == "causal_lm":
            keep = mask.astype(bool)
            a, b = a[keep], b[keep]  # (tokens, vocab)
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        if task != "regression":
            disagree += int((a.argmax(-1) != b.argmax(-1)).sum())
            compared += a.shape[0]
    return {"max_abs_diff": max_diff, "prediction_mismatches": disagree, "predictions_compared": compared,
            "rows": len(rows)}


def ort_generate(sess, kv: dict, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding with the ONNX model and its KV cache: the prompt once, then one token a step."""
    past = {n: np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), dtype=np.float32) for n in past_names(kv)}
    names = past_names(kv)
    ids = np.array([prompt], dtype=np.int64)
    seen, out = 0, []
    for _ in range(new_tokens):
        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, seen + n), dtype=np.int64),
                "position_ids": np.arange(seen, seen + n, dtype=np.int64)[None], **past}
        logits, *present = sess.run(None, feed)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos:
            break
        past = dict(zip(names, present))
        seen += n
        ids = np.array([[token]], dtype=np.int64)
    return out


def eos_ids(model) -> set[int]:
    e = model.generation_config.eos_token_id if model.generation_config else None
    e = model.config.eos_token_id if e is None else e
    return set(e if isinstance(e, list) else [] if e is None else [e])


def prompts(rows: list[dict], k: int) -> list[list[int]]:
    """Prompts from held-out rows: what comes before the response (or the first half of a plain text)."""
    out = []
    for r in rows[:k]:
        first = next((t for t in range(1, len(r["labels"])) if r["labels"][t] != -100), len(r["labels"]))
        cut = first if first < len(r["labels"]) and first >= 2 else max(2, len(r["input_ids"]) // 2)
        out.append(list(r["input_ids"][: min(cut, 32)]))
    return out


def latencies_ms(runs: dict[str, Runner], rows: list[dict], pad_id: int, batch: int, repeats: int) -> dict:
    """Median ms of one forward pass of a batch, per variant. The variants take turns, round after round, so a
    burst of load on the machine slows them all alike rather than the one measured at that moment."""
    ids, mask = batch_arrays((rows * batch)[:batch], pad_id)
    for run in runs.values():
        for _ in range(2):
            run.logits(ids, mask)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run.logits(ids, mask)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------------------------
# The job's export
# ----------------------------------------------------------------------------------------------------------------


def quality_check(task: str, bound: float, reference: dict, quantized: dict) -> tuple[str, float, bool]:
    """(what was compared, the figure, whether it is within the bound)."""
    if task == "classification":
        drop = 100 * (reference["accuracy"] - quantized["accuracy"])
        return "accuracy drop in points", drop, drop <= bound + 1e-9
    key = "perplexity" if task == "causal_lm" else "mse"
    ratio = quantized[key] / max(reference[key], 1e-12)
    return f"{key} ratio", ratio, ratio <= bound + 1e-9


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
    bound = spec.max_quality_drop if spec.max_quality_drop is not None else QUALITY_DEFAULT[task]
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

    def fail(reason: str) -> None:
        report["failure"] = reason
        _finish(tmp, failed_dir, report)
        raise ExportFailed(f"export: {reason}; the files are kept in {failed_dir}")

    fp32 = tmp / "model.onnx"
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # the exporter's notes on axis names and pytree specs are not the user's
            warnings.simplefilter("ignore")
            kv = export_onnx(model, task, fp32, spec.opset, pad_id)
    except Exception as e:  # noqa: BLE001 - the exporter's own words are the reason
        fail(f"torch.onnx.export failed: {_first_line(e)}")
    report["export_s"] = round(time.perf_counter() - t0, 2)
    log(f"export: ONNX fp32 written ({onnx_bytes(fp32) / 1e6:.1f} MB, {report['export_s']:.1f} s)")
    torch_run = Runner(task, kv, model=model)
    fp32_run = Runner(task, kv, sess=session(fp32, threads))

    p = parity(torch_run, fp32_run, rows[:PARITY_ROWS], pad_id, task)
    p["passed"] = p["max_abs_diff"] <= FP32_ATOL and p["prediction_mismatches"] == 0
    report["checks"]["fp32_parity"] = p
    if not p["passed"]:
        fail(f"ONNX fp32 differs from PyTorch on {p['rows']} held-out rows: max |logit difference| "
             f"{p['max_abs_diff']:.2e} (allowed {FP32_ATOL:g}), {p['prediction_mismatches']} different predictions")

    if task == "causal_lm":
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
            fail(f"greedy generation with the ONNX model and its KV cache gives {bad['onnx']}, generate gives "
                 f"{bad['torch']}")

    calibration = None
    qpath = tmp / "model.quantized.onnx"
    if kind != "none":
        if kind == "int8_static":
            calibration = _calibration(job_dir, data, spec.calibration_samples, pad_id, task, kv, recipe.train.seed)
        t0 = time.perf_counter()
        try:
            quantize(fp32, qpath, kind, calibration)
        except Exception as e:  # noqa: BLE001
            fail(f"{kind} quantization failed: {_first_line(e)}")
        report["quantize_s"] = round(time.perf_counter() - t0, 2)
        log(f"export: {kind} written ({onnx_bytes(qpath) / 1e6:.1f} MB, {report['quantize_s']:.1f} s)")

    variants = {"pytorch_fp32": (torch_run, sum(p.numel() * 4 for p in model.parameters())),
                "onnx_fp32": (fp32_run, onnx_bytes(fp32))}
    if kind != "none":
        variants[f"onnx_{kind}"] = (Runner(task, kv, sess=session(qpath, threads)), onnx_bytes(qpath))
    runs = {name: run for name, (run, _) in variants.items()}
    b1 = latencies_ms(runs, rows, pad_id, 1, repeats)
    b8 = latencies_ms(runs, rows, pad_id, 8, repeats)
    for name, (run, size) in variants.items():
        report["variants"][name] = {"bytes": size, **score(run, rows, pad_id, task),
                                    "latency_ms_b1": round(b1[name], 3), "latency_ms_b8": round(b8[name], 3)}
    if kind != "none":
        what, figure, ok = quality_check(task, bound, report["variants"]["pytorch_fp32"],
                                         report["variants"][f"onnx_{kind}"])
        report["checks"]["quantized_quality"] = {"compared": what, "value": figure, "bound": bound, "passed": ok,
                                                 "rows": len(rows)}
        if not ok:
            fail(f"the {kind} model is worse than PyTorch on {len(rows)} test rows: {what} {figure:.4g}, allowed "
                 f"{bound:g} (export.max_quality_drop)")

    tok.save_pretrained(tmp)
    if (model_dir / "labels.json").exists():
        shutil.copy(model_dir / "labels.json", tmp / "labels.json")
    (tmp / "export.json").write_text(json.dumps({"task": task, "quantize": kind, "pad_token_id": pad_id,
                                                 "kv": kv, "eos": sorted(eos_ids(model)) if kv else None}, indent=2))
    (tmp / "README.md").write_text(_readme(task, kind))
    report["passed"] = True
    report["total_s"] = round(time.perf_counter() - t_start, 2)
    _finish(tmp, out, report)
    for line in table(report):
        log(line)
    return report


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


def table(report: dict) -> list[str]:
    """The size / speed / quality table of an export, as lines."""
    metric = {"classification": "accuracy", "regression": "mse", "causal_lm": "perplexity"}[report["task"]]
    lines = [f"{'variant':<24}{'size MB':>10}{'b1 ms':>10}{'b8 ms':>10}{metric:>12}"]
    for name, v in report["variants"].items():
        lines.append(f"{name:<24}{v['bytes'] / 1e6:>10.2f}{v['latency_ms_b1']:>10.2f}{v['latency_ms_b8']:>10.2f}"
                     f"{v[metric]:>12.4f}")
    return lines


def _readme(task: str, kind: str) -> str:
    q = "model.quantized.onnx" if kind != "none" else "model.onnx"
    if task == "causal_lm":
        use = f'''```python
import json, numpy as np, onnxruntime as ort
from transformers import AutoTokenizer   # or the `tokenizers` package with tokenizer.json

tok = AutoTokenizer.from_pretrained(".")
meta = json.load(open("export.json"))
kv = meta["kv"]
sess = ort.InferenceSession("{q}", providers=["CPUExecutionProvider"])
names = [f"past_key_values.{{i}}.{{x}}" for i in range(kv["layers"]) for x in ("key", "value")]
past = {{n: np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), np.float32) for n in names}}
ids = np.array([tok("Once upon a time")["input_ids"]], np.int64)
seen, out = 0, []
for _ in range(20):                                  # greedy: the prompt once, then one token a step
    n = ids.shape[1]
    logits, *present = sess.run(None, {{"input_ids": ids, "attention_mask": np.ones((1, seen + n), np.int64),
                                       "position_ids": np.arange(seen, seen + n)[None], **past}})
    token = int(logits[0, -1].argmax()); out.append(token)
    if token in meta["eos"]: break
    past, seen, ids = dict(zip(names, present)), seen + n, np.array([[token]], np.int64)
print(tok.decode(out))
```'''
    else:
        use = f'''```python
import json, numpy as np, onnxruntime as ort
from transformers import AutoTokenizer   # or the `tokenizers` package with tokenizer.json

tok = AutoTokenizer.from_pretrained(".")
sess = ort.InferenceSession("{q}", providers=["CPUExecutionProvider"])
enc = tok(["first text", "a second, longer text"], padding=True, return_tensors="np")
logits = sess.run(["logits"], {{"input_ids": enc["input_ids"].astype(np.int64),
                               "attention_mask": enc["attention_mask"].astype(np.int64)}})[0]
''' + ('labels = json.load(open("labels.json"))\nprint([labels[i] for i in logits.argmax(-1)])\n```'
       if task == "classification" else "print(logits[:, 0])   # the predicted values\n```")
    return f"""# ONNX export

`model.onnx` (+ `model.onnx.data`) is the fine-tuned model in fp32; `model.quantized.onnx` (+ `.data`), when
present, is its `{kind}` quantization. Both passed the checks in `export_report.json` against the PyTorch model.
Keep each `.onnx` file beside its `.data` file. Inputs are int64 `input_ids` and `attention_mask` of shape
(batch, sequence){", plus `position_ids` and the KV cache for a causal LM" if task == "causal_lm" else ""}.

Run it with onnxruntime alone:

{use}
"""


def _first_line(e: BaseException) -> str:
    """The line of an exception worth showing (the exporter wraps the real error in a page of advice)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    inner = [m.group(1) + ": " + m.group(2) for ln in lines if (m := re.match(r"<class '[\w.]*?(\w+)'>: (.*)", ln))]
    return (inner[0] if inner else lines[0] if lines else type(e).__name__)[:400]


# ----------------------------------------------------------------------------------------------------------------
# Predict with an exported model (no PyTorch)
# ----------------------------------------------------------------------------------------------------------------


def predict(export_dir: Path, texts: list[str], threads: int = 2, new_tokens: int = 32) -> list[dict]:
    from transformers import AutoTokenizer

    meta = json.loads((export_dir / "export.json").read_text())
    path = export_dir / ("model.quantized.onnx" if (export_dir / "model.quantized.onnx").exists() else "model.onnx")
    sess = session(path, threads)
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    if meta["task"] == "causal_lm":
        eos = set(meta["eos"] or [])
        out = []
        for t in texts:
            ids = tok(t)["input_ids"]
            gen = ort_generate(sess, meta["kv"], ids, new_tokens, eos)
            out.append({"text": t, "generated": tok.decode([g for g in gen if g not in eos], skip_special_tokens=True)})
        return out
    enc = tok(texts, padding=True, truncation=True, return_tensors="np")
    logits = sess.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                   "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    if meta["task"] == "regression":
        return [{"text": t, "value": float(v)} for t, v in zip(texts, logits[:, 0])]
    labels = json.loads((export_dir / "labels.json").read_text())
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [{"text": t, "label": labels[int(p.argmax())],
             "scores": {labels[i]: round(float(x), 4) for i, x in enumerate(p)}} for t, p in zip(texts, probs)]


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args and args[0] == "predict":
        ap = argparse.ArgumentParser(prog="python -m jobs.export predict")
        ap.add_argument("job_dir", type=Path)
        ap.add_argument("texts", nargs="+")
        ap.add_argument("--json", action="store_true")
        a = ap.parse_args(args[1:])
        where = latest_export(a.job_dir)
        if where is None:
            print(f"job {a.job_dir.name} has no ONNX export that passed its checks; make one with: runner export "
                  f"{a.job_dir.name}", file=sys.stderr)
            return 2
        for r in predict(where, a.texts):
            if a.json:
                print(json.dumps(r))
            elif "label" in r:
                print(f"{r['label']}\t" + " ".join(f"{k}={v:.3f}" for k, v in r["scores"].items()) + f"\t{r['text']}")
            elif "value" in r:
                print(f"{r['value']:.4f}\t{r['text']}")
            else:
                print(f"{r['text']}{r['generated']}")
        return 0
    ap = argparse.ArgumentParser(prog="python -m jobs.export")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("--quantize", choices=["none", "int8_dynamic", "int8_static", "int4_weight_only"])
    ap.add_argument("--opset", type=int)
    ap.add_argument("--max-quality-drop", type=float)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(args)
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
