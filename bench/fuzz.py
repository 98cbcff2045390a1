"""Fuzz: hostile recipes, request bodies and data files through `runner validate`, POST /jobs and pre-flight.

    python bench/fuzz.py [--inputs 10000] [--data 150] [--seed 0]

Recipes are mutated from the shipped ones (tests/hostile.py: dropped and renamed keys, wrong types, unicode, huge
and negative numbers, YAML aliases, deep nesting, binary junk, truncation, splices...). Each goes through
`runner validate --schema-only` (the CLI in this process, as typer runs it) and through POST /jobs of a real runner
server (its own process, no Ray: jobs stay queued); one in ten requests is a hostile body instead (not JSON, wrong
types, deep JSON, bad names). Data files broken the ways real ones are (bad rows, NUL lines, wrong encodings, empty
files, huge lines, deep JSON, junk parquet...) go through the pre-flight of a quickstart recipe that trains on them
(`python -m jobs.preflight`, what `runner validate` runs in a child process, here in this one; the real tokenizer of
all-MiniLM-L6-v2), and a sample of them through `runner validate` itself (its figure includes starting a Python
process that imports torch and transformers, about 2.5 s here).

A traceback is an exception that reaches the user (the CLI's, or a line `Traceback` in what it printed or in the
server's log); an HTTP 500 is one. Seconds are per input and per path (validate, POST, pre-flight). The
server's peak is its VmHWM less its resident size after a warm-up. The last line is one JSON object.
"""

from __future__ import annotations


import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile import base_recipes, bad_body, bad_data_file, mutate_recipe  # noqa: E402
from procmem import rss_mb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=10_000, help="Hostile recipes and bodies.")
    ap.add_argument("--data", type=int, default=150, help="Broken data files through pre-flight.")
    ap.add_argument("--cli-sample", type=int, default=10, help="Data files also run through `runner validate`.")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import httpx
    from typer.testing import CliRunner

    from runner.cli import app
    from runner.local import free_port, healthy

    rng = random.Random(a.seed)
    bases = base_recipes()
    work = Path(tempfile.mkdtemp(prefix="runner-fuzz-"))
    home = work / "home"
    home.mkdir()
    port = free_port()
    log = open(work / "server.log", "w")
    env = {**os.environ, "RUNNER_HOME": str(home)}
    env.pop("RUNNER_TOKEN", None)
    server = subprocess.Popen([sys.executable, "-m", "runner.server", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not healthy(url):
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit(f"the server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    http = httpx.Client(base_url=url, timeout=60)
    quick = (ROOT / "recipes" / "quickstart.yaml").read_text()
    for _ in range(30):  # warm-up: the idle size is that of a server that has taken recipes
        http.post("/jobs", json={"recipe": quick, "base_dir": str(ROOT / "recipes")})
    idle, _ = rss_mb(server.pid)

    cli = CliRunner()
    tried = collections.Counter()
    tracebacks: list[str] = []
    http_500s: list[str] = []
    slowest = (0.0, "")
    codes = collections.Counter()

    def timed(what: str, kind: str, fn):
        nonlocal slowest
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, f"{what} {kind}")
        return out

    def validate(args: list[str], kind: str) -> None:
        res = cli.invoke(app, args)
        if (res.exception is not None and not isinstance(res.exception, SystemExit)) or "Traceback" in res.output:
            tb = "".join(traceback.format_exception(res.exception)) if res.exception else res.output
            tracebacks.append(f"validate {kind}: {tb[-600:]}")
        elif res.exit_code not in (0, 2):
            tracebacks.append(f"validate {kind}: exit {res.exit_code}: {res.output[-300:]}")

    t_start = time.perf_counter()
    for i in range(a.inputs):
        kind, raw = mutate_recipe(rng, bases)
        text = raw.decode("utf-8", "replace")
        tried[kind] += 1
        path = work / "r.yaml"
        path.write_bytes(raw)
        timed("validate", kind, lambda: validate(["validate", str(path), "--schema-only"], kind))
        if i % 10 == 9:
            body_kind, body, headers = bad_body(rng, text)
            tried[f"body:{body_kind}"] += 1
            r = timed("POST /jobs body", body_kind, lambda: http.post("/jobs", content=body, headers=headers))
            kind = f"body:{body_kind}"
        else:
            r = timed("POST /jobs", kind, lambda: http.post("/jobs", json={"recipe": text,
                                                                         "base_dir": str(ROOT / "recipes")}))
        codes[r.status_code] += 1
        if r.status_code >= 500:
            http_500s.append(f"{kind}: {r.text[:200]}")
    recipe_s = time.perf_counter() - t_start

    import contextlib
    import io

    from jobs.preflight import main as preflight_main

    def preflight(path: Path, kind: str) -> None:
        """What `runner validate` runs in its child process (python -m jobs.preflight), here in this one."""
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = preflight_main([str(path), "--json"])
        except Exception:  # noqa: BLE001 - what the fuzz is looking for
            tracebacks.append(f"pre-flight {kind}: {traceback.format_exc()[-600:]}")
            return
        if code not in (0, 2) or "Traceback" in out.getvalue():
            tracebacks.append(f"pre-flight {kind}: exit {code}: {out.getvalue()[-300:]}")

    sampled, cli_times = 0, []
    rows = [json.loads(x) for x in (ROOT / "recipes/data/topics/train.jsonl").read_text().splitlines()[:200]]
    data_slowest = (0.0, "")
    data_dir = work / "data"
    data_dir.mkdir()
    warm = work / "warm.yaml"  # the first pre-flight in a process pays its imports: not any input's time
    warm.write_text(quick.replace("data/topics/", str(ROOT / "recipes/data/topics") + "/"))
    preflight(warm, "warm-up")
    t_data = time.perf_counter()
    for _ in range(a.data):
        kind, file = bad_data_file(rng, data_dir, rows)
        tried[f"data:{kind}"] += 1
        recipe = quick.replace("train: data/topics/train.jsonl", f"train: {file}")
        rpath = work / "data.yaml"
        rpath.write_text(recipe.replace("data/topics/", str(ROOT / "recipes/data/topics") + "/"))
        t0 = time.perf_counter()
        preflight(rpath, f"data:{kind}")
        dt = time.perf_counter() - t0
        if dt > data_slowest[0]:
            data_slowest = (dt, kind)
        if sampled < a.cli_sample:  # as a user runs it: `runner validate`, its pre-flight in a process of its own
            sampled += 1
            t0 = time.perf_counter()
            out = subprocess.run([str(Path(sys.executable).parent / "runner"), "validate", str(rpath)],
                                 capture_output=True, text=True, cwd=work)
            cli_times.append(time.perf_counter() - t0)
            if "Traceback" in out.stdout + out.stderr or out.returncode not in (0, 2):
                tracebacks.append(f"runner validate data:{kind}: exit {out.returncode}: {out.stderr[-300:]}")
        file.unlink()
    data_s = time.perf_counter() - t_data

    now, peak = rss_mb(server.pid)
    server.terminate()
    server.wait(timeout=30)
    log.close()
    server_tb = (work / "server.log").read_text(errors="replace").count("Traceback")

    print(f"{a.inputs} recipes and bodies in {recipe_s:.0f} s ({1000 * recipe_s / max(a.inputs, 1):.1f} ms each, "
          f"validate and POST); {a.data} data files in {data_s:.0f} s")
    print("HTTP answers: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())))
    print(f"slowest recipe input: {slowest[0]:.3f} s ({slowest[1]}); slowest data file's pre-flight: "
          f"{data_slowest[0]:.2f} s ({data_slowest[1]}); `runner validate` of a data file, its process start "
          f"included: {max(cli_times, default=0):.1f} s at most ({len(cli_times)} tried)")
    print(f"server: {idle:.0f} MB idle, peak {peak:.0f} MB, now {now:.0f} MB; tracebacks in its log: {server_tb}")
    for line in (tracebacks + http_500s)[:10]:
        print("  " + line.replace("\n", " | ")[:400])
    print(json.dumps({
        "inputs": a.inputs + a.data, "recipes_and_bodies": a.inputs, "data_files": a.data,
        "tracebacks": len(tracebacks) + server_tb, "http_500s": len(http_500s),
        "slowest_s": round(max(slowest[0], data_slowest[0]), 3), "slowest_recipe_s": round(slowest[0], 3),
        "slowest_data_s": round(data_slowest[0], 2), "slowest_cli_validate_s": round(max(cli_times, default=0), 1),
        "server_peak_mb_over_idle": round(peak - idle, 1), "kinds": dict(sorted(tried.items())),
        "http_codes": {str(k): v for k, v in sorted(codes.items())}}))


if __name__ == "__main__":
    main()
