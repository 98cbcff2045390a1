"""The `runner` command line: a thin skin over the library; each command parses, calls one function, prints.

Imports no torch: pre-flight, which needs datasets and a tokenizer, runs as `python -m jobs.preflight` in a child
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from jobs.recipe import RecipeError, json_schema, load_recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="runner: fine-tune models from one YAML recipe on a Ray cluster.",
    pretty_exceptions_enable=False,
)

EXIT_INVALID = 2


def _fail(lines: list[str] | str, code: int = EXIT_INVALID) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


@app.command()
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
        if as_json:
            typer.echo(json.dumps({"ok": False, "problems": [p._asdict() for p in e.problems], "notes": []}))
            raise typer.Exit(EXIT_INVALID)
        _fail(e.render())
    if show_defaults:
        typer.echo(r.to_yaml(), nl=False)
        if schema_only:
            return
    report = {"ok": True, "problems": [], "notes": []}
    if not schema_only:
        report = run_preflight(recipe)
    if as_json:
        typer.echo(json.dumps(report))
        raise typer.Exit(0 if report["ok"] else EXIT_INVALID)
    if not report["ok"]:
        n = len(report["problems"])
        _fail([f"{recipe}: {n} problem{'s' if n != 1 else ''}"]
              + ["  " + _render(p, str(recipe)) for p in report["problems"]]
              + [f"  note: {x}" for x in report["notes"]])
    for note in report["notes"]:
        typer.echo(f"note: {note}")
    summary = ", ".join(f"{k} {v}" for k, v in report.get("rows", {}).items())
    what = "recipe is valid" if schema_only else f"ready to run ({summary} examples)" if summary else "ready to run"
    typer.echo(f"{recipe}: {what}")
    if report.get("labels"):
        typer.echo(f"labels: {', '.join(report['labels'])}")
    typer.echo(f"next: runner run {recipe}")


def run_preflight(recipe: Path) -> dict:
    """Run `jobs.preflight` in a child process (it imports datasets and transformers); return its report."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "jobs.preflight", str(recipe), "--json"], capture_output=True,
                          text=True, env=env)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        _fail(f"{recipe}: the pre-flight check itself failed ({tail}); run python -m jobs.preflight {recipe}",
              code=1)
    report["ok"] = not report["problems"]
    return report


def _render(p: dict, source: str) -> str:
    where = f"{source}:{p['line']}" if p.get("line") else source
    return f"{where}: {p['path']}: {p['message']}" if p.get("path") else f"{where}: {p['message']}"


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema, for editors (e.g. the YAML language server's `# yaml-language-server: $schema=`)."""
    typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
