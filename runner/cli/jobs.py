"""The verbs about jobs, through the runner server: submit, list, status, logs, artifacts, cancel, retry, rm, and
the dashboard.

Each ends with the next useful commands. A job's id is its folder's name under $RUNNER_HOME/artifacts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from jobs.jobdir import TERMINAL, JobState
from jobs.recipe import RecipeError, env_refs, load_recipe
from runner.cli.common import EXIT_FAILED, ago, api, fail, get, metrics_line, problem_lines, result_lines, \
    run_preflight, say_next, server, when
from runner.client import Client, ClientError, connect


# --- submit and follow --------------------------------------------------------------------------------------------


def submit(
    recipe: Path = typer.Argument(..., help="The recipe file.", show_default=False),
    detach: bool = typer.Option(False, "--detach", "-d", help="Queue the job and return at once."),
    priority: Optional[int] = typer.Option(None, "--priority", min=-100, max=100,
                                           help="Higher starts first (default: the recipe's, else 0)."),
    name: Optional[str] = typer.Option(None, "--name", help="The job's name (default: the recipe's)."),
) -> None:
    """Check a recipe and its data, queue it on the runner server, and follow it to the end.

    The job runs on the server's Ray cluster and survives this command: Ctrl-C only stops following it
    (`runner logs -f ID` follows it again). Exit 0 when the job SUCCEEDED (or was detached), 1 when it failed,
    2 when the recipe or its data has problems (nothing is queued then).
    """
    try:
        r = load_recipe(recipe)
    except RecipeError as e:
        report = run_preflight(recipe) if e.partial is not None else \
            {"problems": [p._asdict() for p in e.problems]}  # the data too, where it can be read: all at once
        fail(problem_lines(recipe, report["problems"], "; nothing was queued"))
    report = run_preflight(recipe, _cluster_gpu_size(r))
    if not report["ok"]:
        fail(problem_lines(recipe, report["problems"], "; nothing was queued"))
    client = server(start=True)
    text = recipe.read_text(encoding="utf-8")
    env = {k: os.environ[k] for k in env_refs(text) if k in os.environ}  # for the server's check; never stored
    job = api(client.post, "/jobs", {"recipe": text,
                                      "base_dir": str(recipe.resolve().parent), "priority": priority, "name": name,
                                      "env": env})
    where = f", #{job['queue_position']} in the queue ({job['waiting_for']})" if job.get("queue_position") else ""
    typer.echo(f"job {job['id']} QUEUED{where}")
    if detach:
        say_next(f"runner logs -f {job['id']}", f"runner status {job['id']}", f"runner cancel {job['id']}")
        return
    follow(client, job["id"])


def _cluster_gpu_size(recipe) -> dict:
    """For a GPU recipe that does not say its GPUs' memory, sent to a remote server (RUNNER_SERVER): the smallest
    GPU of the server's cluster, for the pre-flight memory check (a local cluster's GPUs are this machine's, which
    the pre-flight reads itself). Nothing when the server does not answer or Ray reports no GPU memory."""
    if not (recipe.needs_gpu and recipe.resources.gpu_memory_gib is None and os.environ.get("RUNNER_SERVER")):
        return {}
    try:
        nodes = connect(False).get("/cluster")["nodes"]
    except ClientError:
        return {}
    gpus = [n for n in nodes if n.get("gpus") and n.get("gpu_memory_bytes")]
    if not gpus:
        return {}
    small = min(gpus, key=lambda n: n["gpu_memory_bytes"])
    return {"RUNNER_CLUSTER_GPU_MEMORY_GIB": f"{small['gpu_memory_bytes'] / 2**30:.3f}",
            "RUNNER_CLUSTER_GPU_NAME": small.get("gpu_name") or ""}


def follow(client: Client, job_id: str) -> None:
    """States as lines, a progress bar of the training steps (lines when not on a terminal), then the result.

    Ctrl-C detaches: the job goes on."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    bar = Progress(TextColumn("{task.fields[where]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=console, disable=not console.is_terminal)
    task = bar.add_task("train", total=None, where="waiting for the first step", info="")
    state, step, shown = None, 0, 0.0
    try:
        with bar:
            while True:
                job = api(client.get, f"/jobs/{job_id}")
                if job["state"] != state:
                    state = job["state"]
                    extra = f" ({job['waiting_for']})" if state == JobState.QUEUED else \
                        f": {job['reason']}" if job.get("reason") else ""
                    bar.console.print(f"{time.strftime('%H:%M:%S')} {state}{extra}")
                for m in api(client.get, f"/jobs/{job_id}/metrics", split="train", after_step=step)["metrics"]:
                    step = m["step"]
                    bar.update(task, completed=step, total=m.get("total_steps"),
                               where=f"step {step}/{m.get('total_steps') or '?'}",
                               info=f"loss {m['loss']:.4f}  {m.get('samples_per_s', 0):.1f} samples/s")
                    if not console.is_terminal and (time.monotonic() - shown > 5 or step == m.get("total_steps")):
                        shown = time.monotonic()
                        typer.echo(f"step {step}/{m.get('total_steps')} loss {m['loss']:.4f}", err=True)
                if state in TERMINAL:
                    break
                time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo(f"\ndetached: job {job_id} goes on", err=True)
        say_next(f"runner logs -f {job_id}", f"runner status {job_id}", f"runner cancel {job_id}")
        raise typer.Exit(0)
    _ending(job)


def _ending(job: dict) -> None:
    jid = job["id"]
    if job["state"] == JobState.SUCCEEDED:
        typer.echo(f"job {jid} SUCCEEDED")
        for line in result_lines(job.get("result"), [w["message"] for w in job.get("warnings", [])]):
            typer.echo(line)
        say_next(f"runner artifacts {jid}", f"runner predict {jid} \"some text\"")
        return
    typer.echo(f"job {jid} {job['state']}: {job.get('reason') or 'no reason given'}", err=True)
    say_next(f"runner logs {jid}", f"runner retry {jid}", f"runner retry {jid} --from-checkpoint")
    raise typer.Exit(EXIT_FAILED)


# --- read verbs ---------------------------------------------------------------------------------------------------


def list_jobs(
    state: Optional[str] = typer.Option(None, "--state", help="Only jobs in this state (QUEUED, RUNNING, ...)."),
    name: Optional[str] = typer.Option(None, "--name", help="Only jobs of this name."),
    limit: int = typer.Option(20, "--limit", min=1, max=500, help="How many, newest first."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many first (paging)."),
    as_json: bool = typer.Option(False, "--json", help="Print the server's answer as JSON."),
) -> None:
    """The jobs, newest first; a queued job with its place in the queue and what it waits for."""
    out = get("/jobs", as_json, state=state, name=name, limit=limit, offset=offset)
    if out is None:
        return
    jobs = out["jobs"]
    if not jobs:
        typer.echo("no jobs" + (" match" if state or name else " yet"))
        say_next("runner submit recipe.yaml")
        return
    rows = []  # a sweep's trials under it, indented
    for j in jobs:
        rows.append((j["id"], j))
        rows += [(f"  {t['id']}", t) for t in (j.get("sweep") or {}).get("trials", [])]
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'ID':<{width}}  {'STATE':<10} {'PRI':>4}  {'UPDATED':<10} NOTE")
    for shown, j in rows:
        if "priority" not in j:  # a trial: its values and best validation figure
            best = f", best {j['best']:.4g}" if isinstance(j.get("best"), (int, float)) else ""
            note = ", ".join(f"{k}={v}" for k, v in j["values"].items()) + best + ("  (chosen)" if j["chosen"] else "")
            typer.echo(f"{shown:<{width}}  {j['state']:<10} {'':>4}  {'':<10} {note}")
            continue
        queued = j["state"] == JobState.QUEUED
        note = f"#{j['queue_position']}: {j['waiting_for']}" if queued else (j.get("reason") or "")
        if j.get("sweep") and not queued:
            sw = j["sweep"]
            note = (f"sweep: {len(sw['trials'])}/{sw['trial_count'] or '?'} trials"
                    + (f", chose {sw['chosen']}" if sw.get("chosen") else "") + (f"; {note}" if note else ""))
        typer.echo(f"{shown:<{width}}  {j['state']:<10} {j['priority']:>4}  {ago(j['updated_at']):<10} {note}")
    say_next("runner status ID", "runner logs -f ID")


def sweep_table(sw: dict) -> list[str]:
    """A sweep's trials as `runner status` prints them: values, state, best validation figure, steps, time."""
    names = sorted({k for t in sw["trials"] for k in t["values"]})
    head = ["TRIAL", *names, "STATE", f"BEST {sw['metric'].upper()}", "STEPS", "TIME"]
    rows = []
    for t in sw["trials"]:
        best = f"{t['best']:.4g} @{t['best_step']}" if isinstance(t.get("best"), (int, float)) else "-"
        steps = f"{t['steps']}/{t['total_steps']}" if t.get("steps") is not None else "-"
        took = f"{t['duration_s']:.0f} s" if t.get("duration_s") is not None else "-"
        rows.append([t["id"].rsplit("-", 1)[-1] + (" *" if t["chosen"] else ""),
                     *(f"{v:.4g}" if isinstance(v := t["values"].get(n, "-"), float) else str(v) for n in names),
                     t["state"], best, steps, took])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    better = "higher" if sw["higher_is_better"] else "lower"
    lines.append(f"chosen on validation {sw['metric']} ({better} is better): "
                 + (f"{sw['chosen']} (*); the test split is scored once, on it" if sw.get("chosen") else
                    "not yet (the search is not over)"))
    return lines


def status(
    job_id: str = typer.Argument(..., metavar="ID", help="The job's id.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the job, its events and last metrics as JSON."),
) -> None:
    """One job: state and reason, queue place, attempts, progress, the last events."""
    client = server()
    job = api(client.get, f"/jobs/{job_id}")
    events = api(client.get, f"/jobs/{job_id}/events")["events"]
    train = api(client.get, f"/jobs/{job_id}/metrics", split="train")["metrics"]
    if as_json:
        typer.echo(json.dumps({**job, "events": events, "last_metrics": train[-1] if train else None}, indent=2))
        return
    typer.echo(f"job {job['id']}   ({job['name']})")
    typer.echo(f"state:     {job['state']}" + (f": {job['reason']}" if job.get("reason") else ""))
    if job["state"] == JobState.QUEUED:
        typer.echo(f"queue:     #{job['queue_position']}, {job['waiting_for']}")
    typer.echo(f"resources: {job['workers']} worker(s) x ({job['cpus']:g} CPUs"
               + (f", {job['gpus']:g} GPUs)" if job["gpus"] else ")") + f", priority {job['priority']}")
    typer.echo(f"attempt:   {job['attempt']}   created {when(job['created_at'])}, started {when(job['started_at'])},"
               f" ended {when(job['ended_at'])}")
    if train:
        m = train[-1]
        typer.echo(f"progress:  step {m['step']}/{m.get('total_steps', '?')}, loss {m['loss']:.4f}")
    for line in result_lines(job.get("result"), [w["message"] for w in job.get("warnings", [])]):
        typer.echo(line)
    if job.get("sweep"):
        typer.echo(f"trials:    {len(job['sweep']['trials'])} of {job['sweep']['trial_count'] or '?'}")
        for line in sweep_table(job["sweep"]):
            typer.echo(f"  {line}")
    if job.get("kind") == "trial":
        typer.echo(f"sweep:     {job['parent']}, values " + ", ".join(f"{k}={v}" for k, v in job["values"].items()))
    typer.echo(f"folder:    {job['job_dir']}")
    typer.echo("events:")
    for e in events[-8:]:
        move = f"{e['state_from'] or ''} -> {e['state_to']}  " if e["state_to"] else ""
        typer.echo(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))}  {move}{e['message']}")
    jid = job["id"]
    if job["state"] in TERMINAL:
        say_next(f"runner artifacts {jid}", f"runner logs {jid}", *([f"runner retry {jid}"]
                                                                 if job["state"] != JobState.SUCCEEDED else []))
    else:
        say_next(f"runner logs -f {jid}", f"runner cancel {jid}")


def logs(
    job_id: str = typer.Argument(..., metavar="ID", help="The job's id.", show_default=False),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends."),
) -> None:
    """The job's log (its driver's output: pre-flight, progress, evaluation, export); -f follows it live."""
    client = server()
    if not follow_:
        typer.echo(api(client.get, f"/jobs/{job_id}/logs")["text"], nl=False)
        return
    try:
        for event, data in client.events(f"/jobs/{job_id}/logs", follow="true"):
            if event == "log":
                typer.echo(data)
            elif event == "end":
                typer.echo(f"job {job_id} ended: {data}", err=True)
                break
    except ClientError as e:
        fail(str(e), code=EXIT_FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    say_next(f"runner status {job_id}", f"runner artifacts {job_id}")


def artifacts(
    job_id: str = typer.Argument(..., metavar="ID", help="The job's id.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the file list and results as JSON."),
) -> None:
    """The job's folder: its files with sizes, the test metrics and the export's checks."""
    out = api(server().get, f"/jobs/{job_id}/artifacts")
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"folder: {out['job_dir']}")
    for f in out["files"]:
        typer.echo(f"  {f['bytes']:>12,}  {f['path']}")
    if out.get("eval"):
        typer.echo("test: " + metrics_line(out["eval"].get("test", {})))
    if out.get("export"):
        typer.echo(f"export: {'passed' if out['export'].get('passed') else 'FAILED'} its checks "
                   f"(onnx/export_report.json)")
    say_next(f"runner predict {job_id} \"some text\"", f"runner export {job_id} --quantize int8_static")


# --- write verbs --------------------------------------------------------------------------------------------------


def cancel(job_id: str = typer.Argument(..., metavar="ID", help="The job's id.", show_default=False)) -> None:
    """Cancel a job: a queued one at once; a running one's processes stop within seconds."""
    job = api(server(start=True).post, f"/jobs/{job_id}/cancel")
    if job["state"] == JobState.CANCELLED:
        typer.echo(f"job {job_id} CANCELLED")
    else:
        typer.echo(f"job {job_id}: stopping (was {job['state']}); its resources go to the next queued job")
    say_next(f"runner status {job_id}", f"runner retry {job_id} --from-checkpoint")


def retry(
    job_id: str = typer.Argument(..., metavar="ID", help="A FAILED or CANCELLED job.", show_default=False),
    from_checkpoint: bool = typer.Option(False, "--from-checkpoint",
                                         help="Go on from the job's last checkpoint, at the step and data "
                                              "position it recorded (default: from the start)."),
) -> None:
    """Queue an ended job again as a new attempt, with the same recipe, id and folder."""
    job = api(server(start=True).post, f"/jobs/{job_id}/retry", {"from_checkpoint": from_checkpoint})
    how = "from its last checkpoint" if from_checkpoint else "from the start (the earlier attempt's results move " \
                                                             "to earlier/)"
    typer.echo(f"job {job_id} QUEUED again, attempt {job['attempt'] + 1}, {how}")
    say_next(f"runner logs -f {job_id}", f"runner status {job_id}")


def remove(job_ids: list[str] = typer.Argument(..., metavar="ID...", help="Ended jobs' ids.", show_default=False)) \
        -> None:
    """Remove ended jobs: each one's folder (checkpoints, model, exports) and its records. A running job must be
    cancelled first; a registered model version's job stays while the version does."""
    client = server(start=True)
    refused = []
    for job_id in job_ids:  # each on its own: one refusal does not stop the others
        try:
            got = client.call("DELETE", f"/jobs/{job_id}")
        except ClientError as e:
            refused.append(job_id)
            typer.echo(f"job {job_id}: {e}", err=True)
            continue
        where = "" if got.get("folder") == "removed" else f"; its folder was {got.get('folder')}"
        typer.echo(f"removed job {job_id} ({got['bytes'] / 1e6:.1f} MB){where}")
    say_next("runner list")
    if refused:
        raise typer.Exit(EXIT_FAILED)


def dashboard(no_open: bool = typer.Option(False, "--no-open", help="Print the address; open no browser.")) -> None:
    """Open the dashboard (jobs, their curves and logs, the cluster) in the browser; starts the local server first
    where none runs. With a token (the local server has one of its own) it opens a one-time sign-in link."""
    import webbrowser

    client = server(start=True)
    page = f"{client.url}/ui/jobs"
    if client.token:  # a one-time sign-in link: the token itself never goes into a URL
        code = api(client.post, "/login/code")["code"]
        page = f"{client.url}/login?code={code}&next=/ui/jobs"
        typer.echo(f"dashboard: {page}")
        typer.echo("(a sign-in link for one browser, good for ten minutes; run runner dashboard again for another)")
    else:
        typer.echo(f"dashboard: {page}")
    if not no_open and not webbrowser.open(page):
        typer.echo("no browser to open here: open the address above in yours", err=True)
    say_next("runner list", "runner submit recipe.yaml")
