"""The verbs that work on this machine without a server: validate, run, export, predict, view, schema.

Imports no torch: pre-flight, a job's driver and an export run as `python -m jobs....` in child processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from jobs.jobdir import latest_export, warnings_since
from jobs.recipe import SNAPSHOT, RecipeError, json_schema, load_recipe
from runner.cli.common import EXIT_FAILED, EXIT_INVALID, QUIET_ENV, fail, problem_lines, result_lines, \
    run_preflight
from runner.client import artifacts_root


def sweep_plan(r) -> dict:
    """What `runner validate` says of a sweep: its trials and the most it holds at once."""
    res, sw = r.resources, r.sweep
    workers = res.workers * min(sw.max_concurrent, sw.count)
    return {"trials": sw.count, "search": sw.search, "metric": r.sweep_metric[0], "max_concurrent": sw.max_concurrent,
            "workers": workers, "cpus_per_worker": res.cpus_per_worker, "gpus_per_worker": res.gpus_per_worker,
            "cpus": workers * res.cpus_per_worker, "gpus": workers * res.gpus_per_worker}


def validate(
    recipe: Path = typer.Argument(..., help="The recipe file.", show_default=False),
    show_defaults: bool = typer.Option(False, "--show-defaults", help="Print the recipe with every default filled in."),
    schema_only: bool = typer.Option(False, "--schema-only", help="Check the recipe's keys and values only; "
                                                                  "skip the data, model and length checks."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Check a recipe, its data and its model before anything is scheduled.

    Exit 0 when the job can run; exit 2 with every problem listed, each with its key, file and line.
    """
    try:
        r = load_recipe(recipe)
    except RecipeError as e:
        # pre-flight checks the data too where the sections it needs parse: every problem at once
        report = {"ok": False, "problems": [p._asdict() for p in e.problems], "notes": []} \
            if schema_only or e.partial is None else run_preflight(recipe)
        if as_json:
            typer.echo(json.dumps(report))
            raise typer.Exit(EXIT_INVALID)
        fail(problem_lines(recipe, report["problems"]))
    if show_defaults:
        typer.echo(r.to_yaml(), nl=False)
        if schema_only:
            return
    report = {"ok": True, "problems": [], "notes": []}
    if not schema_only:
        report = run_preflight(recipe)
    if r.sweep is not None:
        report["sweep"] = sweep_plan(r)
    if as_json:
        typer.echo(json.dumps(report))
        raise typer.Exit(0 if report["ok"] else EXIT_INVALID)
    if not report["ok"]:
        fail(problem_lines(recipe, report["problems"]) + [f"  note: {x}" for x in report["notes"]])
    for note in report["notes"]:
        typer.echo(f"note: {note}")
    summary = ", ".join(f"{k} {v}" for k, v in report.get("rows", {}).items())
    what = "recipe is valid" if schema_only else f"ready to run ({summary} examples)" if summary else "ready to run"
    typer.echo(f"{recipe}: {what}")
    if report.get("labels"):
        typer.echo(f"labels: {', '.join(report['labels'])}")
    if r.sweep is not None:
        plan = report["sweep"]
        typer.echo(f"sweep: {plan['trials']} trials ({plan['search']}), {plan['max_concurrent']} at once, chosen on "
                   f"validation {plan['metric']}; holds at most {plan['workers']} workers x "
                   f"({plan['cpus_per_worker']:g} CPUs" + (f", {plan['gpus_per_worker']:g} GPUs)" if
                                                          plan["gpus_per_worker"] else ")")
                   + f" = {plan['cpus']:g} CPUs" + (f", {plan['gpus']:g} GPUs" if plan["gpus"] else "") + " at once")
    typer.echo(f"next: runner submit {recipe}   |   runner run {recipe}   (in the foreground, without a server)")


def new_job_dir(name: str) -> Path:
    """<RUNNER_HOME>/artifacts/<name>-<UTC time>-<random>: sortable, unique, readable."""
    import secrets
    import time

    job_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    d = artifacts_root() / job_id
    d.mkdir(parents=True)
    return d


def find_job(ref: str) -> Path:
    """A job by its id (a folder under $RUNNER_HOME/artifacts) or by its folder's path."""
    root = artifacts_root()
    for d in (Path(ref).expanduser(), root / ref):
        if d.is_dir() and (d / "recipe.yaml").is_file():
            return d.resolve()
    known = sorted(p.name for p in root.iterdir() if (p / "recipe.yaml").is_file()) if root.is_dir() else []
    hint = f"; the latest there: {', '.join(known[-3:])}" if known else f"; {root} holds no jobs"
    fail(f"no job '{ref}': not a job folder, nor a job id under {root}{hint}")


def run(
    recipe: Optional[Path] = typer.Argument(None, help="The recipe file.", show_default=False),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="JOB",
                                         help="Go on with a cancelled or failed job (its id or folder) from its "
                                              "latest checkpoint, at the step and data position it recorded."),
) -> None:
    """Run a job in the foreground on a local Ray (started for it) or on RAY_ADDRESS, and print its test metrics.

    Ctrl-C stops the workers and leaves no process behind; `runner run --resume JOB` then goes on from the last
    checkpoint. The job's files land in $RUNNER_HOME/artifacts/<job id>/ (RUNNER_HOME defaults to ~/.runner).
    """
    if (recipe is None) == (resume is None):
        fail("give a recipe file (runner run recipe.yaml) or a job to go on with (runner run --resume JOB), "
              "not both")
    if resume is not None:
        job_dir = find_job(resume)
        if (job_dir / "eval.json").exists() and (job_dir / "model").is_dir():
            fail([f"job {job_dir.name} has already finished; its model is in {job_dir / 'model'}",
                   f"to train again from the start: runner run {job_dir / 'recipe.yaml'}"])
        ckpts = sorted((job_dir / "checkpoints").glob("checkpoint_*"))
        typer.echo(f"job {job_dir.name}: going on from {ckpts[-1].name if ckpts else 'the start (no checkpoint yet)'}",
                   err=True)
    else:
        try:
            r = load_recipe(recipe)
        except RecipeError as e:
            fail(e.render())
        job_dir = new_job_dir(r.name)
        (job_dir / "recipe.yaml").write_text(r.snapshot_yaml(), encoding="utf-8")
        typer.echo(f"job {job_dir.name}: {r.task}, {r.tuning.mode}, {r.resources.workers} worker(s)", err=True)
    _drive(job_dir)


def _drive(job_dir: Path) -> None:
    """Run the job's driver (`python -m jobs.entrypoint`) in the foreground; Ctrl-C stops it and its workers."""
    import signal

    # A shell that starts us in the background sets SIGINT to ignored, and Python then never raises
    # KeyboardInterrupt; a foreground job must stop on Ctrl-C wherever it was started from.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    env = {**os.environ, **QUIET_ENV, "PYTHONUNBUFFERED": "1"}
    import time

    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.entrypoint", str(job_dir)], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        proc.communicate()
    except KeyboardInterrupt:
        typer.echo("stopping the job (Ctrl-C again to kill it)", err=True)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        fail([f"job {job_dir.name}: cancelled; its files are in {job_dir}",
               f"to go on from its last checkpoint: runner run --resume {job_dir.name}"], code=130)
    if proc.returncode != 0:
        reason = (job_dir / "failure.txt").read_text().strip() if (job_dir / "failure.txt").exists() else \
            f"the driver exited with code {proc.returncode}"
        fail([f"job {job_dir.name} FAILED: {reason}", f"files: {job_dir}",
               f"after a fix that leaves the recipe as it is, go on with: runner run --resume {job_dir.name}"],
              code=EXIT_FAILED)
    result = json.loads((job_dir / "eval.json").read_text())
    typer.echo(f"job {job_dir.name} SUCCEEDED")
    typer.echo(f"artifacts: {job_dir}")
    for line in result_lines(result, warnings_since(job_dir, since=started)):
        typer.echo(line)
    typer.echo(f"next: ls {job_dir / 'model'}   (loads with from_pretrained)")


def _finished(ref: str) -> Path:
    job_dir = find_job(ref)
    if not (job_dir / "model" / "config.json").exists():
        fail(f"job {job_dir.name} has no trained model yet (model/ is written when training succeeds)")
    return job_dir


def export(
    job: str = typer.Argument(..., help="A finished job: its id or folder.", show_default=False),
    quantize: Optional[str] = typer.Option(None, help="none, int8_dynamic, int8_static or int4_weight_only "
                                                        "(default: the recipe's)."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the recipe's, else 18)."),
    max_quality_drop: Optional[float] = typer.Option(None, help="Bound for the quantized model (see the recipe "
                                                                  "reference)."),
    optimize: Optional[bool] = typer.Option(None, "--optimize/--no-optimize", help="Fuse the graph into "
                                            "onnxruntime's ops before quantizing (default: the recipe's, else on)."),
    require_quantized: Optional[bool] = typer.Option(None, "--require-quantized/--allow-fp32", help="Fail when no "
                                                     "quantized model meets the bound, instead of shipping fp32."),
) -> None:
    """Export a finished job's model to ONNX again, with other settings, into a new folder; no retraining.

    The new export lands in <job>/exports/<UTC time>-<quantize>/ with its own export_report.json, after the same
    checks as the job's own export (fp32 parity, quantized quality, generation for a causal LM).
    """
    from jobs.schema import ExportSpec

    job_dir = _finished(job)
    r = load_recipe(job_dir / "recipe.yaml", allowed=SNAPSHOT)
    changes = {k: v for k, v in {"quantize": quantize, "opset": opset, "max_quality_drop": max_quality_drop,
                                 "optimize": optimize, "require_quantized": require_quantized}.items()
               if v is not None}
    try:
        ExportSpec(**{**r.export.model_dump(), "onnx": True, **changes})
    except ValueError as e:
        errs = getattr(e, "errors", lambda: [])()
        fail([f"--{str(x['loc'][0]).replace('_', '-')}: {x['input']!r}: {x['msg']}" for x in errs] or str(e))
    args = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()]
    proc = subprocess.run([sys.executable, "-m", "jobs.export", str(job_dir), *args], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        fail(f"job {job_dir.name}: the export did not pass (see above)", code=EXIT_FAILED)
    out = json.loads(proc.stdout.strip().splitlines()[-1])["export_dir"]
    typer.echo(f"export: {out}")
    typer.echo(f"next: runner predict {job_dir.name} \"some text\"   |   runner view {job_dir.name}")


def predict(
    job: str = typer.Argument(..., help="A job with an ONNX export: its id or folder.", show_default=False),
    texts: list[str] = typer.Argument(..., help="One or more inputs.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object a line."),
) -> None:
    """Run the job's newest passing ONNX export (the model it ships: quantized, or fp32 when no quantization met its
    bound) on the given texts.

    Classification: the label and each label's score; regression: the value; causal LM: the generated text.
    """
    job_dir = find_job(job)
    proc = subprocess.run([sys.executable, "-m", "jobs.predict", str(job_dir), *texts,
                           *(["--json"] if as_json else [])], text=True,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        raise typer.Exit(proc.returncode)


def view(
    job: str = typer.Argument(..., help="A job with an ONNX export: its id or folder.", show_default=False),
    port: int = typer.Option(8081, help="Local port for Netron."),
    quantized: bool = typer.Option(False, "--quantized", help="Show the quantized graph instead of fp32."),
) -> None:
    """Open the job's ONNX graph in Netron on 127.0.0.1 and print the URL; Ctrl-C stops it."""
    job_dir = find_job(job)
    found = latest_export(job_dir)  # the export `runner predict` uses
    if found is None:
        fail(f"job {job_dir.name} has no ONNX export that passed its checks; make one with: "
             f"runner export {job_dir.name}")
    name = "model.quantized.onnx" if quantized else "model.onnx"
    path = found / name
    if not path.exists():
        fail(f"{path}: no such file (the export has {', '.join(sorted(p.name for p in found.glob('*.onnx')))})")
    import netron

    netron.serve(str(path), None, address=("127.0.0.1", port), browse=False)
    typer.echo(f"Netron: http://127.0.0.1:{port}   ({path}); Ctrl-C stops it")
    try:
        netron.wait()
    except KeyboardInterrupt:
        pass
    finally:
        netron.stop(("127.0.0.1", port))


def schema() -> None:
    """Print the recipe's JSON Schema, for editors (e.g. the YAML language server's `# yaml-language-server: $schema=`)."""
    typer.echo(json.dumps(json_schema(), indent=2))
