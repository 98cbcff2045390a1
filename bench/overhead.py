"""What the runner costs over a bare Accelerate script: the same training, one Ray worker against one process.

    python bench/overhead.py [--steps 300]

Both sides fine-tune all-MiniLM-L6-v2 (full, batch 16, max_seq_len 64) on recipes/data/topics for the same steps,
evaluate once at the end and save the model; each is timed as a whole command (interpreter start to exit), so the
runner's figure includes starting Ray, pre-flight, tokenizing, checkpointing and the manifest. Last line: JSON with
runner_s, bare_s and ratio. Goal: ratio <= 1.15 on a job of about 2 minutes.
"""

import _paths  # noqa: F401 - first: bench/ off sys.path (see _paths.py)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe(steps: int) -> str:
    data = ROOT / "recipes" / "data" / "topics"
    return (f"name: overhead\nmodel:\n  name: sentence-transformers/all-MiniLM-L6-v2\ntask: classification\n"
            f"data:\n  train: {data / 'train.jsonl'}\n  validation: {data / 'validation.jsonl'}\n"
            f"  test: {data / 'test.jsonl'}\n  max_seq_len: 64\ntuning: full\n"
            f"train:\n  max_steps: {steps}\n  batch_size: 16\n  lr: 0.00005\n  eval_every: {steps}\n"
            f"resources:\n  workers: 1\n  cpus_per_worker: 2\n")


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return took, proc.stdout


def runner_phases(home: Path) -> dict:
    """Where the runner's time went, from its job folder: the loop (steps 2..N, as the bare figure) and the rest."""
    job = next((home / "artifacts").iterdir())
    steps = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "split" not in s]
    timings = json.loads((job / "manifest.json").read_text())["timings"]
    return {"loop_s": steps[-1]["time"] - steps[0]["time"], **timings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    (tmp / "recipe.yaml").write_text(recipe(args.steps))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUNNER_HOME": str(tmp / "home"), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "2"}
    bare_s, out = timed([sys.executable, "bench/bare_accelerate.py", str(tmp / "recipe.yaml"), str(tmp / "bare")],
                        env)
    print(out.strip().splitlines()[0], flush=True)
    bare_loop = json.loads(out.strip().splitlines()[-1])["loop_s"]
    runner_s, out = timed([sys.executable, "-m", "runner.cli", "run", str(tmp / "recipe.yaml")], env)
    phases = runner_phases(tmp / "home")
    print(f"runner: steps 2-{args.steps} took {phases['loop_s']:.1f} s; pre-flight {phases['preflight_s']:.1f} s, "
          f"data {phases['prepare_s']:.1f} s, workers (start, loop, eval, save) {phases['train_s']:.1f} s")
    print(f"steps {args.steps}: runner {runner_s:.1f} s, bare Accelerate {bare_s:.1f} s, ratio {runner_s / bare_s:.3f}; "
          f"the loop alone {phases['loop_s']:.1f} s against {bare_loop:.1f} s, ratio {phases['loop_s'] / bare_loop:.3f}")
    print(json.dumps({"steps": args.steps, "runner_s": round(runner_s, 2), "bare_s": round(bare_s, 2),
                      "ratio": round(runner_s / bare_s, 3), "runner_loop_s": round(phases["loop_s"], 2),
                      "bare_loop_s": round(bare_loop, 2), "loop_ratio": round(phases["loop_s"] / bare_loop, 3)}))


if __name__ == "__main__":
    main()
