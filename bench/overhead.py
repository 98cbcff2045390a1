"""What the runner costs over a bare Accelerate script: the same training, one Ray worker against one process.

    python bench/overhead.py [--steps 300] [--rounds 2]

Both sides fine-tune all-MiniLM-L6-v2 (full, batch 16, max_seq_len 64) on recipes/data/topics for the same steps,
evaluate once at the end and save the model; each is timed as a whole command (interpreter start to exit), so the
runner's figure includes starting Ray, pre-flight, tokenizing, checkpointing and the manifest. Each side runs
--rounds times, in the order bare, runner, runner, bare, ... (the figures are means), so that a machine that slows
down over the minutes weighs on both alike. Last line: JSON with runner_s, bare_s and ratio. Goal: ratio <= 1.15 on
a job of about 2 minutes.
"""


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
    job = max((home / "artifacts").iterdir(), key=lambda d: d.stat().st_mtime)
    steps = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "split" not in s]
    timings = json.loads((job / "manifest.json").read_text())["timings"]
    return {"loop_s": steps[-1]["time"] - steps[0]["time"], **timings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each, in the order bare, runner, runner, bare, ... so that a machine that slows "
                         "down or speeds up over the minutes weighs on both alike")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    (tmp / "recipe.yaml").write_text(recipe(args.steps))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUNNER_HOME": str(tmp / "home"), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "2"}
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "runner": []}  # (whole command, steps 2..N)
    order = [("bare", "runner")[(i + 1) // 2 % 2] for i in range(2 * args.rounds)]  # bare runner runner bare ...
    for i, side in enumerate(order):
        if side == "bare":
            took, out = timed([sys.executable, "bench/bare_accelerate.py", str(tmp / "recipe.yaml"),
                               str(tmp / f"bare{i}")], env)
            loop = json.loads(out.strip().splitlines()[-1])["loop_s"]
            print(f"bare:   {took:6.1f} s, steps 2-{args.steps} {loop:6.1f} s", flush=True)
        else:
            took, out = timed([sys.executable, "-m", "runner.cli", "run", str(tmp / "recipe.yaml")], env)
            ph = runner_phases(tmp / "home")
            loop = ph["loop_s"]
            print(f"runner: {took:6.1f} s, steps 2-{args.steps} {loop:6.1f} s; pre-flight {ph['preflight_s']:.1f} s, "
                  f"data {ph['prepare_s']:.1f} s, workers (start, loop, eval, save) {ph['train_s']:.1f} s",
                  flush=True)
        runs[side].append((took, loop))
    runner_s, bare_s = (sum(t for t, _ in runs[k]) / args.rounds for k in ("runner", "bare"))
    runner_loop, bare_loop = (sum(x for _, x in runs[k]) / args.rounds for k in ("runner", "bare"))
    print(f"steps {args.steps}, mean of {args.rounds}: runner {runner_s:.1f} s, bare Accelerate {bare_s:.1f} s, "
          f"ratio {runner_s / bare_s:.3f}; the loop alone {runner_loop:.1f} s against {bare_loop:.1f} s, ratio "
          f"{runner_loop / bare_loop:.3f}; outside the loop {runner_s - runner_loop:.1f} s against "
          f"{bare_s - bare_loop:.1f} s")
    _, out = timed([sys.executable, "bench/ray_floor.py"], env)
    floor = json.loads(out.strip().splitlines()[-1])["floor_s"]
    print(f"Ray and Ray Train by themselves (bench/ray_floor.py: start, one worker that trains nothing, shutdown): "
          f"{floor:.1f} s, so no runner on Ray Train gets below ratio {(bare_s + floor) / bare_s:.3f} here")
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, "runner_s": round(runner_s, 2),
                      "bare_s": round(bare_s, 2), "ratio": round(runner_s / bare_s, 3),
                      "runner_loop_s": round(runner_loop, 2), "bare_loop_s": round(bare_loop, 2),
                      "loop_ratio": round(runner_loop / bare_loop, 3), "ray_floor_s": floor,
                      "floor_ratio": round((bare_s + floor) / bare_s, 3),
                      "runs": {k: [[round(a, 2), round(b, 2)] for a, b in v] for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
