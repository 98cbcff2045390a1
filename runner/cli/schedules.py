"""`runner schedule add|list|show|next|pause|resume|remove|trigger`: schedules kept by the runner server."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import typer

from jobs.recipe import RecipeError, env_refs, load_recipe
from runner.cli.common import api, fail, get, say_next, server

schedule_app = typer.Typer(help="Retrain a recipe on a cron or when its data changes (kept by the runner server).",
                           no_args_is_help=True)
NAME = typer.Argument(..., metavar="NAME", help="The schedule's name (its recipe's name).", show_default=False)


def _local(t: float | None) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if t else "-"


def _line(s: dict) -> str:
    nxt = s["next"][0]["local"] if s.get("next") else ("paused" if s["paused"] else "on a data change")
    last = s["fires"][0] if s.get("fires") else None
    told = f"{last['outcome']} {_local(last['slot_at'])}" if last else "no fire yet"
    return f"{s['id']:<28} {('paused ' if s['paused'] else '') + s['what']:<52} next {nxt}   last {told}"


@schedule_app.command("add")
def add(recipe: Path = typer.Argument(..., help="A recipe with a `schedule` section.", show_default=False)) -> None:
    """Keep the recipe retraining on its schedule: `schedule.cron` (in `schedule.timezone`) and/or
    `schedule.on_data_change`. The recipe is checked now; each fire queues it as `runner submit` would."""
    try:
        load_recipe(recipe)
    except RecipeError as e:
        fail(e.render())
    text = recipe.read_text(encoding="utf-8")
    env = {k: os.environ[k] for k in env_refs(text) if k in os.environ}
    s = api(server(start=True).post, "/schedules",
            {"recipe": text, "base_dir": str(recipe.resolve().parent), "env": env})
    typer.echo(f"schedule {s['id']}: {s['what']}, concurrency {s['concurrency']}")
    if s["next"]:
        typer.echo(f"next fire: {s['next'][0]['local']} ({s['next'][0]['utc']})")
    say_next(f"runner schedule next {s['id']}", f"runner schedule trigger {s['id']}", "runner schedule list")


@schedule_app.command("list")
def listing(as_json: bool = typer.Option(False, "--json", help="The server's answer as JSON.")) -> None:
    """Every schedule with its next fire and its last outcome."""
    got = get("/schedules", as_json)
    if got is None:
        return
    for s in got["schedules"]:
        typer.echo(_line(s))
    if not got["schedules"]:
        typer.echo("no schedules")
    say_next("runner schedule add recipe.yaml", "runner schedule show NAME")


@schedule_app.command("show")
def show(name: str = NAME, fires: int = typer.Option(20, "--fires", help="How many of the last fires."),
         as_json: bool = typer.Option(False, "--json", help="The server's answer as JSON.")) -> None:
    """One schedule: what fires it, and each fire's outcome (submitted, skipped, missed) with its reason."""
    s = get(f"/schedules/{name}", as_json, fires=fires)
    if s is None:
        return
    typer.echo(f"schedule {s['id']}: {s['what']}, concurrency {s['concurrency']}"
               f"{', PAUSED' if s['paused'] else ''}")
    if s["next"]:
        typer.echo(f"next fire: {s['next'][0]['local']} ({s['next'][0]['utc']})")
    for f in s["fires"]:
        job = f" -> job {f['job_id']}" if f["job_id"] else ""
        typer.echo(f"  {_local(f['slot_at'])}  {f['outcome']:<9} {f['reason']}{job}")
    say_next(f"runner schedule next {name}", f"runner schedule {'resume' if s['paused'] else 'pause'} {name}")


@schedule_app.command("next")
def upcoming(name: str = NAME, n: int = typer.Option(5, "-n", help="How many.")) -> None:
    """The next N fire times, in the schedule's time zone and in UTC."""
    got = api(server().get, f"/schedules/{name}/next", n=n)
    for f in got["next"]:
        typer.echo(f"{f['local']}   {f['utc']}")
    say_next(f"runner schedule show {name}")


@schedule_app.command("pause")
def pause(name: str = NAME) -> None:
    """Fires while paused are recorded as skipped; none is made up on resume."""
    api(server(start=True).post, f"/schedules/{name}/pause")
    typer.echo(f"schedule {name} paused")
    say_next(f"runner schedule resume {name}")


@schedule_app.command("resume")
def resume(name: str = NAME) -> None:
    s = api(server(start=True).post, f"/schedules/{name}/resume")
    typer.echo(f"schedule {name} resumed" + (f"; next fire {s['next'][0]['local']}" if s["next"] else ""))
    say_next(f"runner schedule show {name}")


@schedule_app.command("trigger")
def trigger(name: str = NAME) -> None:
    """Fire now, under the schedule's concurrency policy."""
    f = api(server(start=True).post, f"/schedules/{name}/trigger")
    typer.echo(f"{f['outcome']}: {f['reason']}" + (f" -> job {f['job_id']}" if f["job_id"] else ""))
    say_next(f"runner logs -f {f['job_id']}" if f["job_id"] else f"runner schedule show {name}")


@schedule_app.command("remove")
def remove(name: str = NAME) -> None:
    """Forget the schedule and its fires; the jobs it queued stay."""
    api(server(start=True).call, "DELETE", f"/schedules/{name}")
    typer.echo(f"schedule {name} removed")
    say_next("runner schedule list")
