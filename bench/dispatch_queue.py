"""How fast the runner's queue dispatches: many tiny jobs submitted at once to the local runner server.

    python bench/dispatch_queue.py [--jobs 100]

Starts a local Ray head and runner server of its own (a temporary RUNNER_HOME, as `runner submit` would on first
use), submits the jobs at once through the REST API (each: a tiny BERT built here, one worker of one CPU, 2 training
steps, no export), waits for all of them, and reads Ray's own record of each job (start and end of its driver).

Figures, from Ray's job records and the runner's store:
- submit-to-start: from the job's creation in the store to Ray starting its driver. With more jobs than the
  cluster holds this is mostly waiting for a place, so it grows with the queue; printed, but not the goal.
- dispatch overhead: from the moment a job *could* start (its submission, or the end of the job whose place it
  took, as Ray recorded it) to Ray starting its driver: noticing the end, planning, claiming and submitting.
- wall time against the sum of the jobs' own run times (driver start to end), and the concurrency that implies.
- all_succeeded_once: every job SUCCEEDED, in one attempt, and Ray holds exactly one submission for it.

Last line: one JSON object with jobs, dispatch_median_s, dispatch_p95_s, submit_to_start_median_s,
submit_to_start_p95_s, wall_s, sum_run_s, all_succeeded_once. Goal: dispatch_median_s <= 0.5.
"""


import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    a = ap.parse_args()

    from ray.job_submission import JobSubmissionClient

    from runner.client import Client
    from runner.local import ensure_local, ray_token, read_state, server_token, stop
    from tiny import keyword_rows, tiny_model_dir, tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="runner-bench-queue-"))
    home = work / "home"
    os.environ.update(RUNNER_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      RUNNER_PORT=os.environ.get("RUNNER_PORT", "8643"))
    os.environ.pop("RAY_AUTH_MODE", None)
    model = tiny_model_dir(work / "bert", "bert", tiny_tokenizer(), weights=True)
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(40)))
    recipe = (f"name: q\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {work / 'd.jsonl'}\n"
              "  max_seq_len: 16\ntrain:\n  max_steps: 2\n  batch_size: 8\nresources:\n  workers: 1\n"
              "  cpus_per_worker: 1\n")
    try:
        t0 = time.time()
        client = Client(ensure_local(home, say=lambda m: print(m, file=sys.stderr)), server_token(home))
        print(f"local Ray and server up in {time.time() - t0:.1f} s; submitting {a.jobs} jobs", file=sys.stderr)
        t_submit = time.time()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: client.post("/jobs", {"recipe": recipe, "name": f"q{i:03d}"})["id"],
                                range(a.jobs)))
        print(f"submitted in {time.time() - t_submit:.1f} s", file=sys.stderr)
        done = 0
        while done < a.jobs:
            time.sleep(2)
            jobs = client.get("/jobs", limit=500)["jobs"]
            now = sum(j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") for j in jobs)
            if now != done:
                done = now
                print(f"{time.time() - t_submit:6.0f} s: {done}/{a.jobs} ended", file=sys.stderr)
        jobs = {j["id"]: client.get(f"/jobs/{j['id']}") for j in client.get("/jobs", limit=500)["jobs"]}
        ray = read_state(home)["ray"]
        rc = JobSubmissionClient(ray["dashboard"], headers={"Authorization": f"Bearer {ray_token(home)}"})
        infos = rc.list_jobs()
    finally:
        stop(home, "server")
        stop(home, "ray")

    by_sub: dict[str, list] = {}
    for info in infos:
        by_sub.setdefault(info.submission_id, []).append(info)
    runs = {}  # job id -> (created, ray start, ray end), seconds
    once = True
    for jid, job in jobs.items():
        mine = by_sub.get(f"{jid}-1", [])
        once &= job["state"] == "SUCCEEDED" and len(job["attempts"]) == 1 and len(mine) == 1 and \
            sum(s.startswith(jid) for s in by_sub) == 1
        if mine:
            runs[jid] = (job["created_at"], mine[0].start_time / 1000, mine[0].end_time / 1000)
    ends = sorted(e for _, _, e in runs.values())
    submit_to_start, overhead = [], []
    for created, start, _ in runs.values():
        freed = [e for e in ends if e <= start]
        ready = max([created] + freed[-1:])
        submit_to_start.append(start - created)
        overhead.append(start - ready)
    wall = max(ends) - min(c for c, _, _ in runs.values())
    sum_run = sum(e - s for _, s, e in runs.values())
    print(f"jobs: {len(jobs)}, each 1 worker x 1 CPU, 2 steps of a tiny BERT; cluster: {os.cpu_count()} CPUs")
    print(f"submit-to-start: median {statistics.median(submit_to_start):.2f} s, p95 {p95(submit_to_start):.2f} s "
          "(mostly waiting for a place)")
    print(f"dispatch overhead: median {statistics.median(overhead):.3f} s, p95 {p95(overhead):.3f} s, "
          f"max {max(overhead):.3f} s")
    print(f"wall {wall:.1f} s against {sum_run:.1f} s of the jobs' own run time "
          f"(x{sum_run / wall:.2f} concurrency); one job: median {statistics.median(e - s for _, s, e in runs.values()):.1f} s")
    print(f"every job SUCCEEDED exactly once: {once}")
    print(json.dumps({"jobs": len(jobs), "dispatch_median_s": round(statistics.median(overhead), 3),
                      "dispatch_p95_s": round(p95(overhead), 3),
                      "submit_to_start_median_s": round(statistics.median(submit_to_start), 2),
                      "submit_to_start_p95_s": round(p95(submit_to_start), 2), "wall_s": round(wall, 1),
                      "sum_run_s": round(sum_run, 1), "all_succeeded_once": once}))
    return 0 if once else 1


if __name__ == "__main__":
    raise SystemExit(main())
