"""The `runner` command line: a thin skin over the library; each command parses, calls one function, prints.

The verbs live in rooms by what they need: `local` (this machine, no server), `jobs` (through the runner server),
`server` (the local server and cluster), `models` and `schedules` (groups of their own); `common` holds what they
share (errors, exit codes, the server client, result lines). They are joined here, and only here.

Imports no torch: pre-flight, a job's driver and an export run in child processes.
"""

from __future__ import annotations

import typer

from runner.cli import jobs, local, models, schedules, server

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="runner: fine-tune models from one YAML recipe on a Ray cluster.",
    pretty_exceptions_enable=False,
)

for fn in (local.validate, local.run, local.export, local.predict, local.view, local.schema):
    app.command()(fn)
for name, fn in (("submit", jobs.submit), ("list", jobs.list_jobs), ("status", jobs.status), ("logs", jobs.logs),
                 ("artifacts", jobs.artifacts), ("cancel", jobs.cancel), ("retry", jobs.retry), ("rm", jobs.remove),
                 ("dashboard", jobs.dashboard)):
    app.command(name)(fn)
app.add_typer(server.server_app, name="server")
app.add_typer(server.cluster_app, name="cluster")
app.add_typer(models.models_app, name="models")
app.add_typer(schedules.schedule_app, name="schedule")


def main() -> None:
    app()
