"""What the export buys on the quickstart's fine-tuned all-MiniLM-L6-v2: size, speed and accuracy of int8 ONNX.

    python bench/export.py [JOB_DIR] [--repeats 30]

JOB_DIR is a finished job of recipes/quickstart.yaml (default: the newest under $RUNNER_HOME/artifacts, or a new
`runner run recipes/quickstart.yaml`). The job's model is exported again into a scratch folder with int8 dynamic
quantization, and PyTorch fp32, ONNX fp32 and ONNX int8 are timed the same way (2 threads, median of repeated runs
on test rows, batch 1 and 8) and scored on the whole test split. Last line: one JSON object.
Goals: size <= 0.3x, at least 2x faster at batch 1 and 8, accuracy drop <= 1 point.
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
    from jobs.export import export_job
    from jobs.export_checks import table
    from jobs.recipe import SNAPSHOT, load_recipe

    recipe = load_recipe(job / "recipe.yaml", allowed=SNAPSHOT)
    recipe = recipe.model_copy(update={"export": recipe.export.model_copy(
        update={"onnx": True, "quantize": "int8_dynamic"})})
    out = Path(tempfile.mkdtemp(prefix="bench-export-")) / "onnx"
    report = export_job(job, recipe, out, threads=2, repeats=args.repeats, log=lambda m: None)
    for line in table(report):
        print(line)
    v = report["variants"]
    pt, q = v["pytorch_fp32"], v["onnx_int8_dynamic"]
    result = {"job": job.name, "test_rows": q["examples"],
              "size_ratio": round(q["bytes"] / pt["bytes"], 3),
              "speedup_b1": round(pt["latency_ms_b1"] / q["latency_ms_b1"], 2),
              "speedup_b8": round(pt["latency_ms_b8"] / q["latency_ms_b8"], 2),
              "speedup_b8_vs_onnx_fp32": round(v["onnx_fp32"]["latency_ms_b8"] / q["latency_ms_b8"], 2),
              "accuracy_fp32": pt["accuracy"], "accuracy_int8": q["accuracy"],
              "accuracy_drop_points": round(100 * (pt["accuracy"] - q["accuracy"]), 2)}
    print(f"int8 ONNX against PyTorch fp32: {result['size_ratio']}x the size, {result['speedup_b1']}x faster at "
          f"batch 1, {result['speedup_b8']}x at batch 8, accuracy {pt['accuracy']:.4f} -> {q['accuracy']:.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
