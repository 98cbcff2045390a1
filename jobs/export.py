"""Export a finished job's model to ONNX, quantize it, and prove both against the PyTorch model.

    python -m jobs.export JOB_DIR [--quantize KIND] [--opset N] [--optimize true|false]
                          [--require-quantized true|false] [--out DIR]          re-export without retraining

Running an export the way the checks do is jobs/export_checks.py; predicting with one is jobs/predict.py.

The driver calls `export_job` after training when the recipe asks for `export.onnx`. Everything is written into
`<out>.tmp/` and renamed to `<out>/` only when every check passed; a failed export is renamed to `<out>.failed/`,
kept for inspection, and its reason fails the job. So `<out>/` never holds stale or unchecked files.

The stages, each in the report (export_report.json) with its figures:
1. torch.onnx (dynamo) writes the fp32 graph; it must match PyTorch on held-out padded batches (max |logit
   difference| <= 1e-3, identical predictions) and, for a causal LM, give `generate`'s greedy tokens with its KV
   cache. A failure here fails the job.
2. Optimisation (`export.optimize`, on by default; jobs/onnx_fusion.py): the graph fused into onnxruntime's
   transformer ops must pass the same checks, or the unfused graph goes on and the report says why.
3. Quantization (jobs/quantize.py) as the recipe asks, scored on every held-out row (test and validation) against
   PyTorch with a 95% interval. When it misses `export.max_quality_drop`, the MatMuls it hurts most are kept in
   fp32 (1, 2, 4, ...) and static int8 is tried; the fastest try within the bound ships. When none is within it,
   the checked fp32 model ships and the report, the job's state and the dashboard say so; with
   `export.require_quantized` the job fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from jobs.export_checks import (
    DISABLED_OPTIMIZERS, FP32_ATOL, GENERATE_PROMPTS, GENERATE_TOKENS, METRIC_ROWS, PARITY_ROWS, QUALITY_DEFAULT,
    Runner, batch_arrays, eos_ids, latencies_ms, ort_generate, outcomes, parity, past_names, prompts, quality_check,
    score, session, summarise, table,
)
from jobs.jobdir import first_line, model_recipe
from jobs.onnx_fusion import fuse, fuse_file, fused_ops, op_counts
from jobs.quantize import prepare, quantize, remove, sensitivity
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
# The job's export
# ----------------------------------------------------------------------------------------------------------------


def onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def held_out_rows(data) -> tuple[list[dict], dict]:
    """Every held-out row (test, then validation), up to METRIC_ROWS, and how many came from each split."""
    rows, counts = [], {}
    for split in ("test", "validation"):
        part = data[split] if split in data else []
        take = min(len(part), METRIC_ROWS - len(rows))
        rows += [part[i] for i in range(take)]
        counts[split] = take
    return rows, counts


def export_job(job_dir: Path, recipe: Recipe, out: Path | None = None, threads: int = 2, repeats: int = 10,
               log=print, fuse_fn=None) -> dict:
    """Export job_dir/model into out (default job_dir/onnx), check it, write export_report.json. Raises
    ExportFailed with the reason after keeping the files in <out>.failed/. `fuse_fn` replaces the graph fusion
    (jobs.onnx_fusion.fuse), for tests."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    job_dir = Path(job_dir)
    out = Path(out) if out else job_dir / "onnx"
    spec, task = recipe.export, recipe.task
    kind = spec.quantize
    tmp = out.with_name(out.name + ".tmp")
    failed_dir = out.with_name(out.name + ".failed")
    inside = job_dir.resolve() == out.resolve() or job_dir.resolve().is_relative_to(out.resolve())
    if inside or (out.exists() and any(out.iterdir()) and not (out / "export_report.json").exists()):
        raise ExportFailed(f"{out} is not an export folder (or holds the job): an export replaces its folder, so it "
                           f"is written only into a new one or an earlier export's")
    for d in (tmp, failed_dir):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    report: dict = {"task": task, "quantize": kind, "opset": spec.opset, "threads": threads, "passed": False,
                    "checks": {}, "optimize": {}, "attempts": [], "variants": {}}
    fp32, fused = tmp / "model.onnx", tmp / "model.fused.onnx"
    try:
        model_dir = job_dir / "model"
        cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
        model = cls.from_pretrained(str(model_dir), dtype=torch.float32).float().eval()  # bf16 does not run on ORT
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        data = datasets.load_from_disk(str(job_dir / "prepared" / "data"))
        rows, report["held_out_rows"] = held_out_rows(data)
        bound = spec.max_quality_drop if spec.max_quality_drop is not None else QUALITY_DEFAULT[task]
        if not rows:
            raise ExportFailed("there are no held-out rows (test or validation) to check the export against")
        kv = _export_fp32(model, task, fp32, spec.opset, pad_id, report, log)
        torch_run = Runner(task, kv, model=model)
        plain_run = Runner(task, kv, sess=session(fp32, threads))
        _check_fp32(torch_run, plain_run, rows, pad_id, task, report)
        if task == "causal_lm":
            _check_generation(model, plain_run, kv, rows, pad_id, report)
        fused_run = _optimize(spec.optimize, fp32, fused, model, torch_run, kv, rows, pad_id, task, threads, report,
                              log, fuse_fn)
        best = (fused, fused_run) if fused_run else (fp32, plain_run)
        runs = {"pytorch_fp32": (torch_run, sum(p.numel() * 4 for p in model.parameters()), None),
                "onnx_fp32": (best[1], onnx_bytes(best[0]), None)}
        if fused_run:
            runs["onnx_fp32_unfused"] = (plain_run, onnx_bytes(fp32), None)
        reference = outcomes(torch_run, rows, pad_id, task)
        if kind != "none":
            tried = _quantize_until_passed(data, recipe, best[0], tmp, kv, rows, pad_id, reference, bound, threads,
                                           report, log)
            runs.update({a["variant"]: (run, a["bytes"], a) for a, run in tried})
        _measure(runs, rows, pad_id, task, repeats, reference, report)
        shipped = _choose(report, kind, bound, spec.require_quantized, log)
        _ship(tmp, fp32, best[0], shipped, {n: r for n, (r, _, _) in runs.items()}, rows, pad_id, threads)
        tok.save_pretrained(tmp)
        if (model_dir / "labels.json").exists():
            shutil.copy(model_dir / "labels.json", tmp / "labels.json")
        (tmp / "export.json").write_text(json.dumps({
            "task": task, "quantize": kind, "variant": report["shipped"]["variant"],
            "model_file": report["shipped"]["file"],
            "optimized": bool(fused_run), "session_options": {"disabled_optimizers": list(DISABLED_OPTIMIZERS)},
            "pad_token_id": pad_id, "kv": kv, "eos": sorted(eos_ids(model)) if kv else None},
            indent=2))
        (tmp / "README.md").write_text(readme(task, report["shipped"]))
    except Exception as e:  # noqa: BLE001 - any failure of the export fails it in words, with its report kept
        why = str(e) if isinstance(e, ExportFailed) else f"{type(e).__name__}: {first_line(e, 400)}"
        report["failure"] = why
        for p in [fused, tmp / "model.quantized.onnx", tmp / "pre.onnx", tmp / "sensitivity.onnx",
                  *tmp.glob("onnx_*.onnx")]:
            remove(p)  # the tries are copies of the model: the report says what they were
        try:
            _finish(tmp, failed_dir, report)
            if (out / "export_report.json").exists():  # an earlier export of another model: not for predict to find
                shutil.rmtree(out, ignore_errors=True)
        except OSError as gone:
            why += f" (and its files could not be kept in {failed_dir}: {gone})"
        raise ExportFailed(f"export: {why}; the files are kept in {failed_dir}") from None
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


def _fp32_parity(torch_run: Runner, run: Runner, rows: list[dict], pad_id: int, task: str) -> tuple[dict, str | None]:
    p = parity(torch_run, run, rows[:PARITY_ROWS], pad_id, task)
    p["passed"] = p["max_abs_diff"] <= FP32_ATOL and p["prediction_mismatches"] == 0
    why = None if p["passed"] else (
        f"differs from PyTorch on {p['rows']} held-out rows: max |logit difference| {p['max_abs_diff']:.2e} (allowed "
        f"{FP32_ATOL:g}), {p['prediction_mismatches']} different predictions")
    return p, why


def _check_fp32(torch_run: Runner, fp32_run: Runner, rows: list[dict], pad_id: int, task: str, report: dict) -> None:
    report["checks"]["fp32_parity"], why = _fp32_parity(torch_run, fp32_run, rows, pad_id, task)
    if why:
        raise ExportFailed(f"ONNX fp32 {why}")


def _generation(model, run: Runner, kv: dict, rows: list[dict], pad_id: int) -> tuple[dict, str | None]:
    """Greedy generation with an ONNX model and its KV cache against `generate`: (the cases, what differs)."""
    eos = eos_ids(model)
    cases = []
    for prompt in prompts(rows, GENERATE_PROMPTS):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=pad_id)
        want = ref[0, len(prompt):].tolist()
        got = ort_generate(run.sess, kv, prompt, len(want), eos)
        cases.append({"prompt_tokens": len(prompt), "torch": want, "onnx": got})
    bad = next((c for c in cases if c["torch"] != c["onnx"]), None)
    why = None if bad is None else (f"greedy generation with the ONNX model and its KV cache gives {bad['onnx']}, "
                                    f"generate gives {bad['torch']}")
    return {"passed": bad is None, "cases": cases}, why


def _check_generation(model, fp32_run: Runner, kv: dict, rows: list[dict], pad_id: int, report: dict) -> None:
    report["checks"]["generation"], why = _generation(model, fp32_run, kv, rows, pad_id)
    if why:
        raise ExportFailed(why)


def _optimize(on: bool, plain: Path, fused: Path, model, torch_run: Runner, kv, rows: list[dict], pad_id: int,
              task: str, threads: int, report: dict, log, fuse_fn) -> Runner | None:
    """The optimisation stage: the fused graph's Runner when it passes the plain graph's checks, else None with the
    reason in report["optimize"]."""
    info = report["optimize"] = {"asked": on, "used": False, "reason": None, "fusions": {}, "fused_ops": {},
                                 "ops_unfused": op_counts(plain)}
    if not on:
        info["reason"] = "export.optimize is false"
        return None
    t0 = time.perf_counter()
    run = None
    try:
        info["fusions"] = fuse_file(plain, fused, fuse_fn or fuse)
        if not any(info["fusions"].values()):
            info["reason"] = "no fusion matched this graph"
        else:
            run = Runner(task, kv, sess=session(fused, threads))
            info["parity"], why = _fp32_parity(torch_run, run, rows, pad_id, task)
            if why is None and task == "causal_lm":
                info["generation"], why = _generation(model, run, kv, rows, pad_id)
            if why:
                info["reason"] = f"the fused graph {why}"
    except Exception as e:  # noqa: BLE001 - a rewriter's failure costs the fusion, never the export
        info["reason"] = f"the fusion failed: {type(e).__name__}: {first_line(e, 300)}"
    info["s"] = round(time.perf_counter() - t0, 2)
    if info["reason"]:
        remove(fused)
        log(f"export: the unfused graph is used: {info['reason']}")
        return None
    info["used"] = True
    info["ops"] = op_counts(fused)
    info["fused_ops"] = fused_ops(info["ops"])
    log(f"export: fused graph checked ({', '.join(f'{n} {op}' for op, n in info['fused_ops'].items())}; "
        f"{info['s']:.1f} s)")
    return run


def _describe(kind: str, kept: int) -> str:
    return kind if not kept else f"{kind}, {kept} MatMul{'s' if kept > 1 else ''} kept in fp32"


def _quantize_until_passed(data, recipe: Recipe, fp32: Path, tmp: Path, kv, rows: list[dict],
                           pad_id: int, reference: np.ndarray, bound: float, threads: int, report: dict,
                           log) -> list[tuple[dict, Runner]]:
    """The recipe's quantization; when it misses the bound, the same with the most hurt MatMuls kept in fp32 (1, 2,
    4, ... up to half of them, until one passes), then static int8. Each try is scored on every held-out row;
    returns (attempt, its Runner) for each that was written."""
    spec, task, kind = recipe.export, recipe.task, recipe.export.quantize
    pre = tmp / "pre.onnx"
    t0 = time.perf_counter()
    try:
        prepare(fp32, pre)
    except Exception as e:  # noqa: BLE001
        raise ExportFailed(f"quantization's pre-processing failed: {first_line(e, 400)}") from None
    calibration = None
    done: list[tuple[dict, Runner]] = []

    def attempt(try_kind: str, keep: list[str]) -> bool:
        nonlocal calibration
        name = f"onnx_{try_kind}" + (f"_keep{len(keep)}" if keep else "")
        path, t = tmp / f"{name}.onnx", time.perf_counter()
        entry = {"variant": name, "kind": try_kind, "description": _describe(try_kind, len(keep)), "kept_fp32": keep,
                 "file": path.name}
        report["attempts"].append(entry)
        try:
            if try_kind == "int8_static" and calibration is None:
                calibration = _calibration(data, spec.calibration_samples, pad_id, task, kv, recipe.train.seed)
            quantize(pre, path, try_kind, calibration, keep)
            run = Runner(task, kv, sess=session(path, threads))
            got = outcomes(run, rows, pad_id, task)
        except Exception as e:  # noqa: BLE001 - one try failing leaves the others
            entry.update(passed=False, error=f"{type(e).__name__}: {first_line(e, 300)}")
            log(f"export: {entry['description']} failed: {entry['error']}")
            remove(path)
            return False
        q = quality_check(task, bound, reference, got)
        entry.update(bytes=onnx_bytes(path), quantize_s=round(time.perf_counter() - t, 2), quality=q,
                     passed=q["passed"], **summarise(task, got))
        if q["passed"] or not done:  # the first try is measured beside the others, as the recipe's own choice
            done.append((entry, run))
        else:  # a miss is let go at once: a large model's session and file each hold a copy of its weights
            del run
            remove(path)
        log(f"export: {entry['description']}: {q['compared']} {q['value']:.4g} (95% interval {q['low']:.3g} to "
            f"{q['high']:.3g}, {q['rows']} rows), allowed {bound:g}: {'passed' if q['passed'] else 'missed'}")
        return q["passed"]

    try:
        if not attempt(kind, []):
            if "error" not in report["attempts"][0]:  # a crashed quantizer would crash again with layers kept
                _escalate(attempt, pre, data, spec, task, kind, pad_id, kv, recipe.train.seed, tmp, report, log)
            if kind == "int8_dynamic":  # another quantizer: worth a try either way
                attempt("int8_static", [])
    finally:
        remove(pre)
    report["quantize_s"] = round(time.perf_counter() - t0, 2)
    return done


def _escalate(attempt, pre: Path, data, spec: ExportSpec, task: str, kind: str, pad_id: int, kv, seed: int,
              tmp: Path, report: dict, log) -> None:
    """The recipe's quantization again with the MatMuls `sensitivity` ranks worst kept in fp32: 1, 2, 4, ... up to
    half of them, until a try is within the bound."""
    try:
        feeds = _calibration(data, min(spec.calibration_samples, 32), pad_id, task, kv, seed)
        ranking = sensitivity(pre, feeds, kind, tmp / "sensitivity.onnx")
    except Exception as e:  # noqa: BLE001 - without a ranking there is nothing to keep; static int8 is still tried
        report["sensitivity_error"] = f"{type(e).__name__}: {first_line(e, 300)}"
        log(f"export: which layers quantization hurts could not be measured: {report['sensitivity_error']}")
        return
    report["sensitivity"] = [{"node": n, "score": round(s, 5)} for n, s in ranking[:20]]
    k = 1
    while ranking and k <= max(1, len(ranking) // 2):
        if attempt(kind, [n for n, _ in ranking[:k]]):
            return
        k *= 2


def _measure(runs: dict, rows: list[dict], pad_id: int, task: str, repeats: int, reference: np.ndarray,
             report: dict) -> None:
    """Each variant's size, the task's metric on the held-out rows, and its latency at batch 1 and 8 (all variants
    taking turns)."""
    b1 = latencies_ms({k: r for k, (r, _, _) in runs.items()}, rows, pad_id, 1, repeats)
    b8 = latencies_ms({k: r for k, (r, _, _) in runs.items()}, rows, pad_id, 8, repeats)
    for name, (run, size, attempt) in runs.items():
        if attempt is not None:
            metric = {k: attempt[k] for k in ("accuracy", "mse", "loss", "perplexity", "tokens", "examples")
                      if k in attempt}
        elif name == "pytorch_fp32":
            metric = summarise(task, reference)
        else:
            metric = score(run, rows, pad_id, task)
        report["variants"][name] = {"bytes": size, **metric, "latency_ms_b1": round(b1[name], 3),
                                    "latency_ms_b8": round(b8[name], 3)}
        if attempt is not None:
            attempt.update(latency_ms_b1=round(b1[name], 3), latency_ms_b8=round(b8[name], 3))


def _choose(report: dict, kind: str, bound: float, required: bool, log) -> dict | None:
    """The fastest quantized try within the bound (at batch 8); None when the fp32 model is shipped. Writes
    report["shipped"] and the quality check of what ships."""
    passed = [a for a in report["attempts"] if a.get("passed")]
    best = min(passed, key=lambda a: a["latency_ms_b8"]) if passed else None
    if best is not None:
        fp32_ms = report["variants"]["onnx_fp32"]["latency_ms_b8"]
        best["slower_than_fp32"] = best["latency_ms_b8"] > fp32_ms
        if best["slower_than_fp32"]:  # smaller still, and what the recipe asked for; the report says it
            log(f"export: {best['description']} is slower than fp32 ONNX at batch 8 on this machine "
                f"({best['latency_ms_b8']:.1f} ms against {fp32_ms:.1f} ms)")
        report["checks"]["quantized_quality"] = best["quality"]
        report["shipped"] = {"variant": best["description"], "file": "model.quantized.onnx", "quantized": True,
                             "kind": best["kind"], "kept_fp32": best["kept_fp32"], "note": None}
        if len(report["attempts"]) > 1:
            log(f"export: shipping {best['description']}, the fastest of {len(passed)} within the bound")
        return best
    report["shipped"] = {"variant": "fp32", "file": "model.onnx", "quantized": False, "kind": "none",
                         "kept_fp32": [], "note": None}
    if kind == "none":
        return None
    tries = "; ".join(f"{a['description']}: " + (f"{a['quality']['compared']} {a['quality']['value']:.4g}"
                                                 if "quality" in a else f"failed, {a.get('error', 'no reason')}")
                      for a in report["attempts"])
    if all("quality" not in a for a in report["attempts"]):
        words = f"quantization failed (tried {tries})"
    else:
        words = f"no quantized model met export.max_quality_drop ({bound:g}) on the held-out rows (tried {tries})"
    if required:
        raise ExportFailed(f"{words}; export.require_quantized is true")
    report["shipped"]["note"] = f"{words}: the checked fp32 ONNX model is shipped"
    log(f"export: {report['shipped']['note']}")
    return None


def _ship(tmp: Path, fp32: Path, best_fp32: Path, shipped: dict | None, runs: dict, rows: list[dict],
          pad_id: int, threads: int) -> None:
    """Leave model.onnx (the fused graph when it passed) and model.quantized.onnx (the chosen try) in tmp, the very
    bytes that were checked, and nothing else that looks like a model. Each moved file answers one held-out batch
    exactly as the session that was scored did."""
    ids, mask = batch_arrays(rows[:8], pad_id)
    if best_fp32 != fp32:
        want = runs["onnx_fp32"].logits(ids, mask)
        _move(best_fp32, fp32)
        _same(fp32, runs["onnx_fp32"], want, ids, mask, threads)
    if shipped is not None:
        want = runs[shipped["variant"]].logits(ids, mask)
        _move(tmp / shipped["file"], tmp / "model.quantized.onnx")
        _same(tmp / "model.quantized.onnx", runs[shipped["variant"]], want, ids, mask, threads)
    for p in tmp.glob("onnx_*.onnx"):
        remove(p)


def _move(src: Path, dst: Path) -> None:
    """Rename an ONNX file and its .data file; the graph names its .data file, so its tensors are pointed at the
    new name (the graph alone is written again, never the weights)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(str(src), load_external_data=False)
    old, new = src.name + ".data", dst.name + ".data"
    for tensor in _tensors(graph.graph):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == old:
                    entry.value = new
    remove(dst)
    if (src.parent / old).exists():
        (src.parent / old).rename(dst.parent / new)
    onnx.save(graph, str(dst))
    src.unlink()


def _tensors(graph):
    """Every tensor of a graph that can live in an external file: initializers (sparse ones too) and the tensors
    of node attributes, subgraphs (If, Loop, Scan) included."""
    import onnx

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _tensors(g)


def _same(path: Path, run: Runner, want, ids, mask, threads: int) -> None:
    got = Runner(run.task, run.kv, sess=session(path, threads)).logits(ids, mask)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=1e-5):
        raise ExportFailed(f"{path.name} answers differently after it was moved into place")


def _finite(x):
    """The report with every non-finite number (a ratio over a zero, a broken model's NaN) as null: JSON has none,
    and a reader (the server's API) refuses a file that writes them."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _finish(tmp: Path, final: Path, report: dict) -> None:
    (tmp / "export_report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _calibration(data, n: int, pad_id: int, task: str, kv, seed: int) -> list[dict]:
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


def readme(task: str, shipped: dict) -> str:
    """The export folder's README.md: what each file is, and how to run it with onnxruntime alone."""
    use = (TEMPLATES / ("use_causal_lm.md" if task == "causal_lm" else "use_encoder.md")).read_text(encoding="utf-8")
    if task != "causal_lm":
        use += ('labels = json.load(open("labels.json"))\nprint([labels[i] for i in logits.argmax(-1)])\n'
                if task == "classification" else "print(logits[:, 0])   # the predicted values\n")
    extra = ", plus `position_ids` and the KV cache for a causal LM" if task == "causal_lm" else ""
    if shipped["quantized"]:
        quantized = (f"`model.quantized.onnx` (+ `.data`) is its quantization, {shipped['variant']}, the model to "
                     f"use. ")
    else:
        quantized = "There is no quantized model" + (f": {shipped['note']}. " if shipped["note"] else ". ")
    return (TEMPLATES / "onnx_README.md").read_text(encoding="utf-8").format(
        quantized=quantized, inputs_extra=extra, use=use.replace("{model}", shipped["file"]).rstrip("\n") + "\n```")


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ap = argparse.ArgumentParser(prog="python -m jobs.export")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("--quantize", choices=["none", "int8_dynamic", "int8_static", "int4_weight_only"])
    ap.add_argument("--opset", type=int)
    ap.add_argument("--max-quality-drop", type=float)
    ap.add_argument("--optimize", choices=["true", "false"])
    ap.add_argument("--require-quantized", choices=["true", "false"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    job_dir = a.job_dir.resolve()
    recipe = load_recipe(model_recipe(job_dir), allowed=SNAPSHOT)
    flags = {k: None if v is None else v == "true" for k, v in (("optimize", a.optimize),
                                                                 ("require_quantized", a.require_quantized))}
    changes = {k: v for k, v in {"onnx": True, "quantize": a.quantize, "opset": a.opset,
                                 "max_quality_drop": a.max_quality_drop, **flags}.items() if v is not None}
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
