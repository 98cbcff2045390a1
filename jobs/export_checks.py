"""Running an exported model the way the checks compare it: PyTorch and onnxruntime sessions behind one `Runner`,
the task's metric (`score`), fp32 parity, greedy generation with the KV cache, latencies, and the quality bound of
the quantized model. Used by the export (jobs/export.py) and by predict (jobs/predict.py)."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from jobs.schema import headline

FP32_ATOL = 1e-3
QUALITY_DEFAULT = {"classification": 1.0, "causal_lm": 1.05, "regression": 1.10}
PARITY_ROWS = 64  # held-out rows compared element-wise, fp32 ONNX against PyTorch
METRIC_ROWS = 5000  # held-out rows (test, then validation) scored by each variant and each quantization try
GENERATE_PROMPTS, GENERATE_TOKENS = 3, 8


# onnxruntime fusions its sessions leave out: SkipLayerNormalization's CPU kernel is 4-5x slower than the Add and
# LayerNormalization it replaces (jobs/onnx_fusion.py); export.json passes this on to the user's sessions
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session(path: Path, threads: int, disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


def past_names(kv: dict) -> list[str]:
    return [f"past_key_values.{i}.{x}" for i in range(kv["layers"]) for x in ("key", "value")]


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


def outcomes(run: Runner, rows: list[dict], pad_id: int, task: str, batch: int = 8) -> np.ndarray:
    """Each row's outcome, what the task's metric averages: 1/0 correct (classification), the squared error
    (regression), or [summed negative log-likelihood, tokens] (causal LM)."""
    out = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        ids, mask = batch_arrays(part, pad_id)
        logits = run.logits(ids, mask)
        if task != "causal_lm":
            logits = logits.astype(np.float64)
        if task == "classification":
            out += list((logits.argmax(-1) == np.array([r["labels"] for r in part])).astype(np.float64))
        elif task == "regression":
            out += list((logits[:, 0] - np.array([float(r["labels"]) for r in part])) ** 2)
        else:
            # log-softmax one position at a time, in float64 over the vocabulary: a batch's whole [b, s, vocab] in
            # float64 would be gigabytes for a real vocabulary
            for j, r in enumerate(part):
                nll, tokens = 0.0, 0
                for t in range(1, len(r["labels"])):
                    if r["labels"][t] != -100:
                        row = logits[j, t - 1].astype(np.float64)
                        top = row.max()
                        nll += float(top + np.log(np.exp(row - top).sum()) - row[r["labels"][t]])
                        tokens += 1
                out.append([nll, tokens])
    return np.array(out, dtype=np.float64)


def summarise(task: str, per_row: np.ndarray) -> dict:
    """The task's metric over rows from their `outcomes`: accuracy, mse or perplexity (with the loss)."""
    n = len(per_row)
    if task == "classification":
        return {"accuracy": float(per_row.sum()) / max(n, 1), "examples": n}
    if task == "regression":
        return {"mse": float(per_row.sum()) / max(n, 1), "examples": n}
    tokens = int(per_row[:, 1].sum()) if n else 0
    loss = float(per_row[:, 0].sum()) / max(tokens, 1) if n else 0.0
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "examples": n}


def score(run: Runner, rows: list[dict], pad_id: int, task: str, batch: int = 8) -> dict:
    """The task's metric over rows: accuracy, mse or perplexity (with the loss)."""
    return summarise(task, outcomes(run, rows, pad_id, task, batch))


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
    """Greedy decoding of one prompt with the ONNX model and its KV cache, up to and with the first EOS."""
    return ort_decode(sess, kv, np.array([prompt], dtype=np.int64), new_tokens, eos)[0].tolist()


def ort_decode(sess, kv: dict, prompts: np.ndarray, new_tokens: int, eos: set[int] = frozenset()) -> np.ndarray:
    """Greedy decoding of a batch of equal-length prompts [b, n] with the ONNX model and its KV cache: the prompts
    once, then one token a step; stops early once every row's last token is an EOS. Returns the tokens [b, k]."""
    names = past_names(kv)
    b = prompts.shape[0]
    past = {n: np.zeros((b, kv["kv_heads"], 0, kv["head_dim"]), dtype=np.float32) for n in names}
    ids, seen, out = prompts, 0, []
    for _ in range(new_tokens):
        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((b, seen + n), dtype=np.int64),
                "position_ids": np.broadcast_to(np.arange(seen, seen + n, dtype=np.int64), (b, n)).copy(), **past}
        logits, *present = sess.run(None, feed)
        token = logits[:, -1].argmax(-1).astype(np.int64)
        out.append(token)
        if eos and all(int(t) in eos for t in token):
            break
        past = dict(zip(names, present))
        seen += n
        ids = token[:, None]
    return np.stack(out, axis=1) if out else np.zeros((b, 0), dtype=np.int64)


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
    """Median ms of one forward pass of a batch of rows, per variant (`latencies_of`)."""
    ids, mask = batch_arrays((rows * batch)[:batch], pad_id)
    return latencies_of(runs, ids, mask, repeats)


def latencies_of(runs: dict[str, Runner], ids: np.ndarray, mask: np.ndarray, repeats: int) -> dict:
    """Median ms of one forward pass, per variant. The variants take turns, round after round, so a burst of load
    on the machine slows them all alike rather than the one measured at that moment. Each turn first waits 20 ms
    and runs once untimed: the thread pools of the variant before (onnxruntime's and OpenMP's spin a while after a
    run) would otherwise take the cores from the first passes, which on 2 cores made PyTorch's batch 1 eight times
    slower and reordered the ONNX variants."""
    for run in runs.values():
        run.logits(ids, mask)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(0.02)
            run.logits(ids, mask)
            for _ in range(2):
                t0 = time.perf_counter()
                run.logits(ids, mask)
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def quality_check(task: str, bound: float, reference: np.ndarray, quantized: np.ndarray) -> dict:
    """The quantized model against the reference on the same rows (their `outcomes`): the figure the bound is
    about, its 95% interval from the paired per-row outcomes, and whether the figure is within the bound.

    classification: the accuracy drop in points, 100 * mean(ref - q), interval mean +- 1.96 sd / sqrt(n);
    regression: the ratio of summed squared errors R = sum(se_q) / sum(se_ref);
    causal LM: the ratio of perplexities exp(L), L = sum(nll_q - nll_ref) / tokens.
    A ratio's interval is the delta method's for a ratio of sums: sd of the residuals e_i = a_i - R * b_i (a the
    numerator's per-row part, b the denominator's) * sqrt(n) / sum(b); for the perplexity, on L.
    The decision is the figure against the bound (a miss costs speed, not the job: the export then keeps layers in
    fp32); the interval says how far a few rows move it."""
    n = len(reference)
    if n == 0:
        raise ValueError("no rows to compare")

    def ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        total = float(b.sum())
        r = float(a.sum()) / total if total > 0 else (0.0 if float(a.sum()) == 0 else math.inf)
        resid = a - r * b if math.isfinite(r) else a
        half = Z95 * float(resid.std(ddof=1)) * math.sqrt(n) / total if n > 1 and total > 0 else 0.0
        return r, half

    if task == "classification":
        d = reference - quantized
        mean = float(d.mean())
        half = Z95 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        what, value, low, high = "accuracy drop in points", 100 * mean, 100 * (mean - half), 100 * (mean + half)
    elif task == "regression":
        what = "mse ratio"
        value, half = ratio(quantized, reference)
        low, high = value - half, value + half
    else:
        what = "perplexity ratio"
        log_ratio, half = ratio(quantized[:, 0] - reference[:, 0], reference[:, 1])
        value, low, high = (math.exp(min(x, 50)) for x in (log_ratio, log_ratio - half, log_ratio + half))
    return {"compared": what, "value": value, "low": low, "high": high, "bound": bound, "rows": n,
            "passed": bool(value <= bound + 1e-9)}


def table(report: dict) -> list[str]:
    """The size / speed / quality table of an export, as lines."""
    metric = headline(report["task"])
    lines = [f"{'variant':<24}{'size MB':>10}{'b1 ms':>10}{'b8 ms':>10}{metric:>12}"]
    for name, v in report["variants"].items():
        lines.append(f"{name:<24}{v['bytes'] / 1e6:>10.2f}{v['latency_ms_b1']:>10.2f}{v['latency_ms_b8']:>10.2f}"
                     f"{v[metric]:>12.4f}")
    return lines
