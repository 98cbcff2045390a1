"""What every group of the CLI shares: exit codes, errors, the server client, and the lines results print as.

A user's mistake, an unknown job, an unreachable server or a stopped Ray is one line on stderr and a non-zero exit
(`fail`), never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import typer

from jobs.recipe import Problem, RecipeError
from runner.client import Client, ClientError, connect

EXIT_FAILED = 1  # a job failed, the server refused, nothing answered
EXIT_INVALID = 2  # a recipe, its data or an argument has problems: nothing was done

# the children the CLI starts (pre-flight, a foreground driver, an export) print only what the user needs
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false"}


def fail(lines: list[str] | str, code: int = EXIT_INVALID) -> NoReturn:
    """Print the lines on stderr and exit with `code`."""
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


def say_next(*cmds: str) -> None:
    """The commands that make sense after this one, on one line."""
    typer.echo("next: " + "   |   ".join(cmds))


# --- recipes and pre-flight ---------------------------------------------------------------------------------------


def problem_lines(recipe: Path, problems: list[dict], tail: str = "") -> list[str]:
    """The heading line and one line per problem ('  recipe.yaml:12: train.lr: ...'), as `validate` and `submit`
    print the problems pre-flight reports: the same lines as a recipe's own errors (jobs.recipe.RecipeError)."""
    found = [Problem(p.get("path") or "", p.get("message") or "", p.get("line")) for p in problems]
    head, *rest = RecipeError(str(recipe), found).render().splitlines()
    return [head + tail, *rest]


def run_preflight(recipe: Path, extra_env: dict | None = None) -> dict:
    """Run `jobs.preflight` in a child process (it imports datasets and transformers); return its report.

    Where the job folders will be where this machine sees them (a local server, or RUNNER_ARTIFACTS named), a
    clean pre-flight leaves its proof there for the driver, which then does not check every row again
    (jobs.tokenized_cache.prove)."""
    env = {**os.environ, **QUIET_ENV, **(extra_env or {})}
    env.pop("RUNNER_VALIDATE_ARTIFACTS", None)
    if os.environ.get("RUNNER_ARTIFACTS") or not os.environ.get("RUNNER_SERVER"):
        from runner.client import artifacts_root

        env["RUNNER_VALIDATE_ARTIFACTS"] = str(artifacts_root())
    proc = subprocess.run([sys.executable, "-m", "jobs.preflight", "--json", "--", str(recipe)], capture_output=True,
                          text=True, env=env)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"{recipe}: the pre-flight check itself failed ({tail}); run python -m jobs.preflight {recipe}",
             code=EXIT_FAILED)
    report["ok"] = not report["problems"]
    return report


# --- results ------------------------------------------------------------------------------------------------------


def metrics_line(figures: dict) -> str:
    """'loss=0.3120, accuracy=0.9950, examples=200': a split's metrics on one line."""
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())


def result_lines(result: dict | None, warnings: list[str]) -> list[str]:
    """A finished job's eval.json and warnings as `status` and the end of `run` and `submit` print them: the test
    metrics, which step's weights were kept and why, the verdict against the baseline, each warning."""
    out = []
    if result:
        out.append("test:      " + metrics_line(result.get("test", {})))
        sel = result.get("selection")
        if sel:
            out.append(f"kept:      step {sel['step']} of {result.get('steps')}: {sel['why']}")
        base = result.get("baseline")
        if base and base.get("verdict"):
            out.append(f"baseline:  {base['verdict']}")
        champ = result.get("champion")
        if champ:
            out.append(f"champion:  {_champion_words(champ)}")
    out += [f"warning:   {w}" for w in warnings]
    return out


def _champion_words(champ: dict) -> str:
    """The like-for-like figure the gate decides on (jobs.compare's section of eval.json), in words."""
    who = f"{champ.get('model')} v{champ.get('version')}"
    pair = champ.get("on_this_test")
    if not isinstance(pair, dict) or not isinstance(pair.get("challenger"), dict) or \
            not isinstance(pair.get("champion"), dict):
        return f"not compared with {who}: {champ.get('note', 'no figures')}"
    figures = [m for m in pair["challenger"] if isinstance(pair["challenger"][m], float)
               and isinstance(pair["champion"].get(m), (int, float))]
    k = champ.get("metric") if champ.get("metric") in figures else (figures[0] if figures else None)
    if k is None:
        return f"not compared with {who}: no figure of both models"
    return (f"on this job's test split ({pair.get('rows')} rows) {k} {pair['challenger'][k]:.4g} here, "
            f"{pair['champion'][k]:.4g} for {who}")


def ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, time.time() - t)
    return f"{s:.0f}s ago" if s < 90 else f"{s / 60:.0f}m ago" if s < 5400 else f"{s / 3600:.1f}h ago"


def when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


# --- the runner server --------------------------------------------------------------------------------------------


def server(start: bool = False) -> Client:
    """The server. Only the verbs that change something start the local one where none runs (start=True); the
    read verbs never start anything: with no server they say so, with the command that starts one."""
    try:
        return connect(start, say=lambda m: typer.echo(m, err=True))
    except ClientError as e:
        fail(str(e), code=EXIT_FAILED)


def api(fn, *args, **kwargs):
    """A call to the server; its refusal (404, 409, 422, 503, unreachable) becomes one line and exit 1 (2 for a
    recipe the server finds invalid)."""
    try:
        return fn(*args, **kwargs)
    except ClientError as e:
        msg = str(e)
        if e.code == 404 and msg.startswith("no job"):
            msg += " (runner list shows the jobs)"
        fail(msg.splitlines(), code=EXIT_INVALID if e.code == 422 else EXIT_FAILED)


def get(path: str, as_json: bool, **params) -> dict | None:
    """The server's answer to GET path; with --json it is printed as it is and None comes back (nothing to add)."""
    got = api(server().get, path, **params)
    if as_json:
        typer.echo(json.dumps(got, indent=2))
        return None
    return got
