"""What the export buys on the quickstart's fine-tuned all-MiniLM-L6-v2, against PyTorch and against the exporter a
user would pick instead (transformers' own OnnxExporter with onnxruntime fusions and its dynamic int8 quantizer).

    python bench/export.py [JOB_DIR] [--repeats 30]

JOB_DIR is a finished job of recipes/quickstart.yaml (default: the newest under $RUNNER_HOME/artifacts, or a new
`runner run recipes/quickstart.yaml`). The job's model is exported twice into a scratch folder with int8 dynamic
quantization, once with the optimisation stage (the fused graph) and once without, and the peer exports the same
model. Then, in one run, on the same rows and 2 threads, every variant takes its turn round after round (a burst of
load on the machine slows them all alike): PyTorch fp32, our ONNX fp32 and int8 (fused and not), the peer's int8.
Shapes: batch 1 and 8 of held-out rows as the quickstart tokenizes them (padded to the longest), and batch 8 x 128
tokens (held-out text run together). Each variant is scored on every held-out row.

Last line: one JSON object. `speedup_*` = PyTorch fp32 latency / our shipped int8's; `vs_peer_*` = the peer's
latency / ours (> 1: we are faster). Goals (issue 19): speedup_b1 >= 5, speedup_b8 >= 3, speedup_b8_s128 >= 3.5,
size_ratio <= 0.3, accuracy drop <= 1 point, vs_peer_b8_s128 >= 1.1, vs_peer_b1 >= 1.
"""


import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def newest_quickstart() -> Path | None:
    root = Path(os.environ.get("RUNNER_HOME") or Path.home() / ".runner") / "artifacts"
    done = [d for d in root.glob("quickstart-topics-*") if (d / "model" / "config.json").exists()]
    return max(done, key=lambda d: d.name) if done else None


def peer_export(model_dir: Path, out: Path) -> tuple[Path | None, str | None]:
    """transformers.exporters.OnnxExporter(ort_fusions="cpu") + OnnxRuntimeQuantizer(dynamic), as its docs show
    them: (the model file, None), or (None, why it was skipped)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        from transformers.exporters import (OnnxConfig, OnnxExporter, OnnxRuntimeDynamicConfig,
                                            OnnxRuntimeQuantizer)
    except ImportError as e:
        import transformers

        return None, f"transformers {transformers.__version__} has no OnnxExporter ({e})"
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sample = {"input_ids": torch.randint(5, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    config = OnnxConfig(dynamic=True, ort_fusions="cpu", quantizer=OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig()))
    try:
        OnnxExporter().export(model, sample, config=config).save_pretrained(str(out))
    except Exception as e:  # noqa: BLE001 - an experimental exporter: its failure is a figure, not a crash
        return None, f"OnnxExporter failed: {type(e).__name__}: {str(e)[:300]}"
    return out / "model.onnx", None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job_dir", nargs="?", type=Path)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    job = args.job_dir or newest_quickstart()
    if job is None:
        print("no finished quickstart job: running recipes/quickstart.yaml first", flush=True)
        subprocess.run([sys.executable, "-m", "runner.cli", "run", "recipes/quickstart.yaml"], cwd=ROOT, check=True)
        job = newest_quickstart()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from jobs.export import export_job, held_out_rows, onnx_bytes
    from jobs.export_checks import DISABLED_OPTIMIZERS, Runner, batch_arrays, latencies_of, score, session
    from jobs.recipe import SNAPSHOT, load_recipe

    recipe = load_recipe(job / "recipe.yaml", allowed=SNAPSHOT)
    scratch = Path(tempfile.mkdtemp(prefix="bench-export-"))
    reports = {}
    for name, optimize in (("fused", True), ("plain", False)):
        r = recipe.model_copy(update={"export": recipe.export.model_copy(
            update={"onnx": True, "quantize": "int8_dynamic", "optimize": optimize})})
        reports[name] = export_job(job, r, scratch / name, threads=2, repeats=3, log=lambda m: None)
    peer, peer_skipped = peer_export(job / "model", scratch / "peer")

    torch.set_num_threads(2)
    model = AutoModelForSequenceClassification.from_pretrained(str(job / "model"), dtype=torch.float32).eval()
    pad_id = json.loads((scratch / "fused" / "export.json").read_text())["pad_token_id"]
    files = {"onnx_fp32": scratch / "plain" / "model.onnx", "onnx_int8": scratch / "plain" / "model.quantized.onnx",
             "onnx_fp32_fused": scratch / "fused" / "model.onnx",
             "onnx_int8_fused": scratch / "fused" / "model.quantized.onnx"}
    if peer is not None:
        files["peer_int8"] = peer
    runs = {"pytorch_fp32": Runner("classification", None, model=model)}
    # ours with the session options export.json ships; the peer as its documentation runs it (default options)
    runs.update({name: Runner("classification", None, sess=session(path, 2, () if name == "peer_int8" else
                                                                   DISABLED_OPTIMIZERS))
                 for name, path in files.items() if path.exists()})
    sizes = {"pytorch_fp32": sum(p.numel() * 4 for p in model.parameters())}
    sizes.update({name: onnx_bytes(path) for name, path in files.items() if path.exists()})

    data = datasets.load_from_disk(str(job / "prepared" / "data"))
    rows, counts = held_out_rows(data)
    long_ids = [t for r in rows for t in r["input_ids"]][: 8 * 128]
    shapes = {"b1": batch_arrays(rows[:1], pad_id), "b8": batch_arrays(rows[:8], pad_id),
              "b8_s128": (np.array(long_ids, dtype=np.int64).reshape(8, 128), np.ones((8, 128), dtype=np.int64))}
    latency = {shape: latencies_of(runs, ids, mask, args.repeats) for shape, (ids, mask) in shapes.items()}
    accuracy = {name: score(run, rows, pad_id, "classification")["accuracy"] for name, run in runs.items()}

    print(f"{len(rows)} held-out rows ({counts}); b1 and b8 at {shapes['b1'][0].shape[1]} and "
          f"{shapes['b8'][0].shape[1]} tokens; 2 threads; median of {args.repeats} interleaved rounds")
    print(f"{'variant':<18}{'size MB':>9}{'b1 ms':>9}{'b8 ms':>9}{'b8x128 ms':>11}{'accuracy':>10}")
    for name in runs:
        print(f"{name:<18}{sizes[name] / 1e6:>9.1f}{latency['b1'][name]:>9.2f}{latency['b8'][name]:>9.2f}"
              f"{latency['b8_s128'][name]:>11.2f}{accuracy[name]:>10.4f}")
    if peer_skipped:
        print(f"peer skipped: {peer_skipped}")
    # ours: what the optimised export ships (its int8, or its fp32 when no quantization met the bound)
    ours, pt = ("onnx_int8_fused" if "onnx_int8_fused" in runs else "onnx_fp32_fused"), "pytorch_fp32"
    plain_int8 = "onnx_int8" if "onnx_int8" in runs else "onnx_fp32"
    result = {
        "job": job.name, "held_out_rows": len(rows), "shipped": reports["fused"]["shipped"]["variant"],
        "size_ratio": round(sizes[ours] / sizes[pt], 3),
        **{f"speedup_{s}": round(latency[s][pt] / latency[s][ours], 2) for s in shapes},
        "speedup_b8_vs_onnx_fp32": round(latency["b8"]["onnx_fp32"] / latency["b8"][ours], 2),
        "speedup_b8_s128_vs_onnx_fp32": round(latency["b8_s128"]["onnx_fp32"] / latency["b8_s128"][ours], 2),
        "int8_fused_vs_unfused_b8_s128": round(latency["b8_s128"][plain_int8] / latency["b8_s128"][ours], 2),
        **({f"vs_peer_{s}": round(latency[s]["peer_int8"] / latency[s][ours], 2) for s in shapes} if peer else
           {"peer_skipped": peer_skipped}),
        "fused_ops": reports["fused"]["optimize"]["fused_ops"],
        "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "accuracy_fp32": accuracy[pt], "accuracy_int8": accuracy[ours],
        "accuracy_drop_points": round(100 * (accuracy[pt] - accuracy[ours]), 2),
        "latency_ms": {s: {k: round(v, 2) for k, v in latency[s].items()} for s in shapes},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
