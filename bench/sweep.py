"""A sweep against the same trials submitted one by one, as a user would without sweeps.

    python bench/sweep.py [--recipe recipes/sweep-quickstart.yaml] [--home DIR]

Through the public CLI on the runner's own local server and Ray head (a RUNNER_HOME of its own unless --home):

1. `runner submit` of the recipe with its `sweep`: wall time from submit to SUCCEEDED, trials stopped early, the
   chosen trial's values, its best validation figure and its test figure (scored once, after the search).
2. The same configurations (the sweep's trial recipes: `sweep` taken out, `train.select_metric` the sweep's metric,
   a checkpoint at each evaluation) as separate `runner submit`s, all queued at once: the queue runs as many at a
   time as the cluster fits (on the 2-CPU local head, 2: the sweep's max_concurrent; on a bigger machine more, which
   favours the separate jobs): wall time from
   the first submit to the last ending, and the best validation figure among them. Each is the recipe as a user
   would submit it, its export included (`--no-export` turns it off: then each job only trains and tests, while
   the sweep's wall time still includes its chosen trial's test and export; its search time is printed apart).
3. The recipe's own defaults as one job (export off: only its figures count): its validation and test figures,
   what the sweep must match or beat.

Figures are of the sweep's metric (validation) and the task's test figure of the same name. Goal: the sweep no
slower than the separate jobs, and its chosen configuration at least as good on validation as the defaults.
Last line: one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "sweep-quickstart.yaml")
    ap.add_argument("--home", type=Path, help="RUNNER_HOME to run in (default: a new temporary one)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds each phase may take")
    ap.add_argument("--no-export", action="store_true", help="the separate jobs without their export")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="runner-sweep-bench-"))
    env = {**os.environ, "RUNNER_HOME": str(home), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    work = Path(tempfile.mkdtemp(prefix="runner-sweep-recipes-"))
    recipe = args.recipe.resolve()

    def runner(*a: str) -> str:
        out = subprocess.run([sys.executable, "-m", "runner.cli", *a], cwd=recipe.parent, env=env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"runner {' '.join(a)}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        return out.stdout

    def submit(path: Path, name: str | None = None) -> str:
        runner("submit", str(path), "--detach", *(["--name", name] if name else []))
        return json.loads(runner("list", "--json", "--limit", "1"))["jobs"][0]["id"]

    def wait(ids: list[str]) -> dict[str, dict]:
        deadline, done = time.monotonic() + args.timeout, {}
        while len(done) < len(ids):
            if time.monotonic() > deadline:
                raise SystemExit(f"not ended within {args.timeout:.0f} s: {sorted(set(ids) - set(done))}")
            for i in ids:
                if i not in done:
                    job = json.loads(runner("status", i, "--json"))
                    if job["state"] in ENDED:
                        done[i] = job
            time.sleep(3)
        bad = {i: j["reason"] for i, j in done.items() if j["state"] != "SUCCEEDED"}
        if bad:
            raise SystemExit(f"jobs did not succeed: {bad}")
        return done

    try:
        t0 = time.perf_counter()
        sweep_id = submit(recipe)
        sweep = wait([sweep_id])[sweep_id]
        sweep_wall = time.perf_counter() - t0
        folder = Path(sweep["job_dir"])
        record = json.loads((folder / "sweep.json").read_text())
        metric = record["metric"]
        chosen = next(t for t in record["trials"] if t["index"] == record["chosen"])
        result = json.loads((folder / "eval.json").read_text())

        separate = []
        for t in record["trials"]:  # the same configurations, as the user would submit them by hand
            d = yaml.safe_load((folder / "trials" / f"t{t['index']:03d}" / "recipe.yaml").read_text())
            d["export"] = yaml.safe_load((folder / "recipe.yaml").read_text())["export"]  # as the recipe says
            if args.no_export:
                d["export"]["onnx"] = False
            p = work / f"trial{t['index']}.yaml"
            p.write_text(yaml.safe_dump(d, sort_keys=False))
            separate.append(p)
        t0 = time.perf_counter()
        ids = [submit(p, f"by-hand-{i}") for i, p in enumerate(separate)]
        jobs = wait(ids)
        separate_wall = time.perf_counter() - t0
        by_hand = [json.loads((Path(j["job_dir"]) / "eval.json").read_text()) for j in jobs.values()]

        d = yaml.safe_load((folder / "recipe.yaml").read_text())
        d.pop("sweep")
        d["export"]["onnx"] = False
        p = work / "defaults.yaml"
        p.write_text(yaml.safe_dump(d, sort_keys=False))
        default_id = submit(p, "defaults")
        default = json.loads((Path(wait([default_id])[default_id]["job_dir"]) / "eval.json").read_text())
    finally:
        subprocess.run([sys.executable, "-m", "runner.cli", "server", "stop"], env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "runner.cli", "cluster", "down"], env=env, capture_output=True)

    higher = record["higher_is_better"]
    best_by_hand = (max if higher else min)(e["validation"][metric] for e in by_hand)
    stopped = [t for t in record["trials"] if t["state"] == "STOPPED"]
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen["values"].items())
    timings = json.loads((folder / "manifest.json").read_text())["timings"]
    print(f"sweep:     {len(record['trials'])} trials in {sweep_wall:.0f} s (the search {timings['search_s']:.0f} s, "
          f"the chosen trial's test {timings['test_s']:.0f} s, its export {timings.get('export_s', 0):.0f} s), "
          f"{len(stopped)} stopped early by ASHA; chose trial {chosen['index']} ({values})")
    print(f"           its validation {metric} {result['validation'][metric]:.4f} (best during the search "
          f"{chosen['best']:.4f}), test {metric} {result['test'][metric]:.4f}, scored once")
    print(f"by hand:   the same {len(separate)} configurations as separate jobs "
          f"({'without' if args.no_export else 'with'} their export) in {separate_wall:.0f} s; best "
          f"validation {metric} {best_by_hand:.4f}")
    print(f"defaults:  validation {metric} {default['validation'][metric]:.4f}, test {default['test'][metric]:.4f}")
    out = {"trials": len(record["trials"]), "stopped_early": len(stopped), "sweep_wall_s": round(sweep_wall, 1),
           "sweep_search_s": round(timings["search_s"], 1), "separate_wall_s": round(separate_wall, 1),
           "separate_exported": not args.no_export, "metric": metric,
           "best_validation": round(result["validation"][metric], 4),
           "separate_best_validation": round(best_by_hand, 4),
           "default_validation": round(default["validation"][metric], 4),
           "chosen_test": round(result["test"][metric], 4), "default_test": round(default["test"][metric], 4),
           "chosen": chosen["values"], "chosen_test_all": result["test"], "default_test_all": default["test"],
           "sweep_no_slower": sweep_wall <= separate_wall,
           "at_least_as_good": (result["validation"][metric] >= default["validation"][metric]) if higher
           else (result["validation"][metric] <= default["validation"][metric])}
    print(json.dumps(out))
    return 0 if out["sweep_no_slower"] and out["at_least_as_good"] else 1


if __name__ == "__main__":
    sys.exit(main())
