"""Predict with a job's newest passing ONNX export (no PyTorch model is loaded).

    python -m jobs.predict JOB_DIR TEXT... [--json]      what `runner predict` runs
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from jobs.export_checks import ort_generate, session
from jobs.jobdir import latest_export


SHIPPABLE = ("model.quantized.onnx", "model.onnx")


def model_file(meta: dict, export_dir: Path) -> str:
    """The file the export ships (export.json's `model_file`: the quantized model, or fp32 when no quantization met
    its bound); an export from before that key: the quantized model when there is one. Only these two names."""
    named = meta.get("model_file")
    if named in SHIPPABLE:
        return named
    return "model.quantized.onnx" if (export_dir / "model.quantized.onnx").exists() else "model.onnx"


def predict(export_dir: Path, texts: list[str], threads: int = 2, new_tokens: int = 32) -> list[dict]:
    from transformers import AutoTokenizer

    meta = json.loads((export_dir / "export.json").read_text())
    path = export_dir / model_file(meta, export_dir)
    if not path.is_file():
        job = export_dir.parent.parent if export_dir.parent.name == "exports" else export_dir.parent
        raise FileNotFoundError(f"{export_dir}: export.json names {path.name}, which is not there; export again "
                                f"with: runner export {job.name}")
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ap = argparse.ArgumentParser(prog="python -m jobs.predict")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
