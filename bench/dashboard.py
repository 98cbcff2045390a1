"""The dashboard's jobs page over a big store: 10,000 jobs, as a team has after some months.

    python bench/dashboard.py [--jobs 10000] [--metrics 60] [--no-ray] [--no-browser]

Fills a new store (a temporary RUNNER_HOME) with jobs in every state: most ended, some running with their latest
figures, some queued, each with `--metrics` training records; then starts the runner server as `runner submit`
does, attached to a local Ray head of its own (`--no-ray`: without one), and asks for the jobs page as a browser
opening it does: GET /ui/jobs (the HTML with its first 25 rows inlined). The first response is timed cold (the
first request the server sees) and warm (median of 20), with its size. Also timed: the JSON the page polls
(/jobs, filtered by state and by text, and a deep page), and, with Chromium present, the time until the table is
drawn in a real browser. The server's resident memory is read from /proc after all of that.

Last line: one JSON object with jobs, first_page_ms, first_page_kb, server_rss_mb, and the other figures.
Goals: first_page_ms <= 300, first_page_kb <= 200, server_rss_mb <= 250.
"""

from __future__ import annotations


import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from procmem import rss_mb

ROOT = Path(__file__).resolve().parents[1]

STATE_MIX = [("SUCCEEDED", 0.62), ("FAILED", 0.18), ("CANCELLED", 0.12), ("QUEUED", 0.05), ("RUNNING", 0.03)]
MODELS = ["sentence-transformers/all-MiniLM-L6-v2", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B",
          "google-bert/bert-base-uncased", "mistralai/Mistral-7B-v0.3"]
MODES = ["lora", "full", "qlora", "freeze"]


def fill(home: Path, n: int, per_job: int) -> float:
    """n jobs through the store's own schema (one transaction: the bench measures reading, not filling)."""
    from runner.store import Store

    t0 = time.perf_counter()
    store = Store(home / "runner.db")
    rng = random.Random(0)
    now = time.time() - n * 60
    jobs, metrics, events = [], [], []
    for i in range(n):
        state = rng.choices([s for s, _ in STATE_MIX], [w for _, w in STATE_MIX])[0]
        model, mode = rng.choice(MODELS), rng.choice(MODES)
        name = f"team-{i % 37}-{model.split('/')[-1].lower()}"
        job_id = f"{name}-{i:05d}"
        created = now + i * 60
        started = None if state == "QUEUED" else created + 5
        ended = created + 900 if state in ("SUCCEEDED", "FAILED", "CANCELLED") else None
        recipe = (f"name: {name}\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: data/train.jsonl\n"
                  f"tuning:\n  mode: {mode}\ntrain:\n  epochs: 3\n  lr: 0.0002\nresources:\n  workers: 2\n"
                  "  gpus_per_worker: 1\n")
        steps = 0 if state == "QUEUED" else per_job
        progress = None
        for s in range(1, steps + 1):
            rec = {"step": s, "epoch": s / per_job, "loss": 2.5 / (1 + s / 20) + rng.random() * 0.05,
                   "lr": 2e-4, "samples_per_s": 90 + rng.random() * 10, "tokens_per_s": 11000.0,
                   "total_steps": per_job * (2 if state == "RUNNING" else 1), "time": started + s * 3}
            metrics.append((job_id, 1, s, "train", rec["time"], json.dumps(rec)))
            progress = {"attempt": 1, "step": s, "total_steps": rec["total_steps"], "loss": rec["loss"],
                        "samples_per_s": rec["samples_per_s"], "tokens_per_s": rec["tokens_per_s"],
                        "time": rec["time"], "t0": started + 3, "step0": 1}
        reason = {"FAILED": "the loss became nan at step 40: lower the learning rate",
                  "CANCELLED": "cancelled by the user"}.get(state)
        jobs.append((job_id, name, state, reason, 0, recipe, str(home / "artifacts" / job_id), 2, 4.0, 1.0,
                     0 if state == "QUEUED" else 1, created, ended or created, started, ended, model, mode,
                     json.dumps(progress) if progress else None))
        events.append((job_id, created, None, "QUEUED", "submitted"))
        if state != "QUEUED":
            events += [(job_id, started, "QUEUED", "STARTING", "starting"),
                       (job_id, started + 2, "STARTING", "RUNNING", "running")]
        if ended:
            events.append((job_id, ended, "RUNNING", state, reason or state.lower()))
    with store._tx():
        store.db.executemany(
            "INSERT INTO jobs (id, name, state, reason, priority, recipe, job_dir, workers, cpus, gpus, attempt, "
            "created_at, updated_at, started_at, ended_at, model, mode, progress) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", jobs)
        store.db.executemany("INSERT INTO metrics (job_id, attempt, step, split, at, data) VALUES (?, ?, ?, ?, ?, ?)",
                             metrics)
        store.db.executemany("INSERT INTO events (job_id, at, state_from, state_to, message) VALUES (?, ?, ?, ?, ?)",
                             events)
    store.close()
    return time.perf_counter() - t0


def timed_get(client, path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.get(path)
    ms = (time.perf_counter() - t0) * 1000
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    return ms, len(r.content)


def browser_ms(url: str, signin=None) -> float | None:
    """Load time of /ui/jobs in headless Chromium (table drawn), median of 5; None when no browser is installed.
    signin: () -> a one-time sign-in URL, where the server has a token."""
    chromium = os.environ.get("RUNNER_CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not Path(chromium).exists():
        return None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                              "--disable-background-networking"])
        page = b.new_page(viewport={"width": 1366, "height": 768})
        page.goto(signin() if signin else f"{url}/ui/jobs")  # once, so that the CSS and script are cached, as for a returning user
        page.wait_for_selector("#jobs tbody tr[data-id]")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            page.goto(f"{url}/ui/jobs")
            page.wait_for_selector("#jobs tbody tr[data-id]")
            times.append((time.perf_counter() - t0) * 1000)
        b.close()
    return round(statistics.median(times), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--metrics", type=int, default=60, help="Training records per job that ran.")
    ap.add_argument("--no-ray", action="store_true", help="Run the server without a Ray cluster attached.")
    ap.add_argument("--no-browser", action="store_true")
    a = ap.parse_args()

    import httpx

    from runner import local

    home = Path(tempfile.mkdtemp(prefix="runner-bench-dash-"))
    fill_s = fill(home, a.jobs, a.metrics)
    db_mb = (home / "runner.db").stat().st_size / 2**20
    print(f"store: {a.jobs} jobs, {a.metrics} records each that ran ({db_mb:.0f} MB) in {fill_s:.1f} s", flush=True)
    ray = proc = None
    try:
        if a.no_ray:
            port = local.free_port()
            proc = local._spawn([sys.executable, "-m", "runner.server", "--port", str(port)], home / "server.log",
                                {**os.environ, "RUNNER_HOME": str(home)})
            url = f"http://127.0.0.1:{port}"
            local._wait(lambda: local.healthy(url), proc, "the runner server", home / "server.log", 60)
            server = {"pid": proc.pid, "url": url}
        else:
            ray = local.start_ray(home)
            local._write_state(home, {"ray": ray})
            server = local.start_server(home, ray["dashboard"])
            local._write_state(home, {"ray": ray, "server": server})
        url, pid = server["url"], server["pid"]
        rss_idle = rss_mb(pid)[0]
        token = None if a.no_ray else local.server_token(home)  # start_server gives the server its token
        c = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"} if token else {})
        cold_ms, size = timed_get(c, "/ui/jobs")
        warm = [timed_get(c, "/ui/jobs")[0] for _ in range(20)]
        poll = [timed_get(c, "/jobs?limit=25")[0] for _ in range(20)]
        by_state = [timed_get(c, "/jobs?limit=25&state=FAILED")[0] for _ in range(10)]
        by_text = [timed_get(c, "/jobs?limit=25&q=qwen")[0] for _ in range(10)]
        deep = [timed_get(c, f"/jobs?limit=25&offset={a.jobs - 25}")[0] for _ in range(10)]
        assets_kb = sum(timed_get(c, f"/ui/static/{n}")[1] for n in ("app.css", "app.js")) / 1024
        metrics_ms = timed_get(c, "/metrics")[0]
        running = c.get("/jobs?state=RUNNING&limit=1").json()["jobs"][0]["id"]
        series_ms = statistics.median(timed_get(c, f"/jobs/{running}/series")[0] for _ in range(10))
        signin = (lambda: f"{url}/login?code={c.post('/login/code').json()['code']}&next=/ui/jobs") if token else None
        rendered = None if a.no_browser else browser_ms(url, signin)
        rss, hwm = rss_mb(pid)
        out = {"jobs": a.jobs, "first_page_ms": round(statistics.median(warm), 1), "first_page_kb": round(size / 1024, 1),
               "server_rss_mb": round(rss, 1), "cold_first_page_ms": round(cold_ms, 1),
               "first_page_p95_ms": round(sorted(warm)[int(0.95 * len(warm)) - 1], 1),
               "poll_ms": round(statistics.median(poll), 1), "filter_state_ms": round(statistics.median(by_state), 1),
               "filter_text_ms": round(statistics.median(by_text), 1), "last_page_ms": round(statistics.median(deep), 1),
               "metrics_ms": round(metrics_ms, 1), "series_ms": round(series_ms, 1),
               "assets_kb": round(assets_kb, 1), "browser_table_drawn_ms": rendered,
               "server_rss_idle_mb": round(rss_idle, 1), "server_peak_rss_mb": round(hwm, 1),
               "ray_attached": not a.no_ray, "store_mb": round(db_mb, 1)}
        print(f"jobs page: first response {out['first_page_ms']} ms (cold {out['cold_first_page_ms']} ms, p95 "
              f"{out['first_page_p95_ms']} ms), {out['first_page_kb']} KB (+ {out['assets_kb']} KB of CSS and script, "
              f"cached); poll {out['poll_ms']} ms; drawn in Chromium in {rendered} ms", flush=True)
        print(f"server memory: {out['server_rss_mb']} MB resident ({out['server_peak_rss_mb']} MB at most)", flush=True)
        print(json.dumps(out))
    finally:
        local.stop(home, "server")
        if ray:
            local.stop(home, "ray")
        if proc is not None:
            proc.terminate()


if __name__ == "__main__":
    main()
