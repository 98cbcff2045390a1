"""The quickstart as a new user runs it, held to what it must show: that the model learned.

    python bench/quickstart.py [--home DIR]

Runs `runner run recipes/quickstart.yaml` (a RUNNER_HOME of its own unless --home) and prints, from the job's
metrics.jsonl and eval.json: the wall time, the learning rate at 75% of the steps against transformers' own
linear-with-warm-up schedule at that point (and against the 0.28 x peak of the schedule read as a function of the
fraction of the run), the test loss against ln(labels) for guessing, the test accuracy against the majority class.
Exit 1 when the lr is more than 10% off the schedule or the test loss is not under 1.0. Last line: one JSON object.
"""


import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def schedule_lr(peak: float, warmup: int, total: int, updates_done: int) -> float:
    """transformers' get_linear_schedule_with_warmup after `updates_done` updates, read from the library itself."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_linear_schedule_with_warmup(probe, warmup, total)
    for _ in range(updates_done):
        probe.step()
        sched.step()
    return sched.get_last_lr()[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, help="RUNNER_HOME to run in (default: a new temporary one)")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="runner-quickstart-"))
    env = {**os.environ, "RUNNER_HOME": str(home), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "runner.cli", "run", "recipes/quickstart.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    job = max((home / "artifacts").glob("quickstart-topics-*"), key=lambda d: d.name)
    recs = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "split" not in r}
    total = max(steps)
    from jobs.recipe import SNAPSHOT, load_recipe

    recipe = load_recipe(job / "recipe.yaml", allowed=SNAPSHOT)
    peak, warmup = recipe.train.lr, round(recipe.train.warmup_ratio * total)
    at = round(0.75 * total)
    want = schedule_lr(peak, warmup, total, at - 1)  # the update of step `at` follows at - 1 updates
    got = steps[at]["lr"]
    fraction = (total - at) / (total - warmup)  # the schedule as a function of the run's fraction: 0.28 at 75%
    result = json.loads((job / "eval.json").read_text())
    labels = len(json.loads((job / "prepared" / "labels.json").read_text()))
    test, base = result["test"], result["baseline"]
    figures = {"wall_s": round(wall, 1), "steps": total, "lr_at_75pct": got, "schedule_lr_at_75pct": want,
               "lr_over_schedule": got / want, "lr_over_peak": got / peak, "fraction_schedule": fraction,
               "test_loss": test["loss"], "guessing_loss": math.log(labels), "test_accuracy": test["accuracy"],
               "majority_accuracy": base["accuracy"], "kept_step": result["selection"]["step"]}
    ok = abs(got / want - 1) <= 0.10 and test["loss"] < 1.0
    print(f"quickstart: {total} steps in {wall:.0f} s (runner run, 2 workers)")
    print(f"lr at step {at} of {total}: {got:.6g} = {got / peak:.3f} x peak; transformers' schedule there: "
          f"{want:.6g} ({got / want:.3f}); as a fraction of the run: {fraction:.3f} x peak")
    print(f"test loss {test['loss']:.4f} (guessing: ln {labels} = {math.log(labels):.3f}), accuracy "
          f"{test['accuracy']:.4f} (majority class: {base['accuracy']:.4f}); kept step {figures['kept_step']}")
    print("PASS" if ok else "FAIL: lr off the schedule by more than 10%, or test loss not under 1.0")
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
