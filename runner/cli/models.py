"""`runner models list|show|promote|rollback|diff`: the model registry kept by the runner server."""

from __future__ import annotations

from datetime import datetime

import typer

from runner.cli.common import api, get, say_next, server

models_app = typer.Typer(help="The model registry: versions of each registered model, aliases, promotion.",
                         no_args_is_help=True)
MODEL = typer.Argument(..., metavar="MODEL", help="The registered name (`register_as`).", show_default=False)


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"


@models_app.command("list")
def listing(as_json: bool = typer.Option(False, "--json", help="The server's answer as JSON.")) -> None:
    """Each registered model: how many versions, and where its aliases point."""
    got = get("/models", as_json)
    if got is None:
        return
    for m in got["models"]:
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "no alias"
        typer.echo(f"{m['model']:<28} {m['versions']} version(s), latest v{m['latest']}   {aliases}")
    if not got["models"]:
        typer.echo("no registered models (a recipe with register_as: NAME registers its SUCCEEDED jobs)")
    say_next("runner models show MODEL")


@models_app.command("show")
def show(model: str = MODEL, as_json: bool = typer.Option(False, "--json", help="The server's answer as JSON.")) -> None:
    """Every version with its job, test metric and the gate's decision; the aliases; every move of an alias."""
    got = get(f"/models/{model}", as_json)
    if got is None:
        return
    marks = {}
    for alias, v in got["aliases"].items():
        marks.setdefault(v, []).append(alias)
    for v in got["versions"]:
        tag = f" [{', '.join(marks[v['version']])}]" if v["version"] in marks else ""
        ships = (v.get("export") or {}).get("variant")
        ships = f"  ships {ships}" if isinstance(ships, str) else ""
        typer.echo(f"v{v['version']}{tag}  job {v['job_id']}  {v['metric']} {_value(v['value'])}{ships}  "
                   f"{v['decision']}")
    typer.echo("moves:")
    for e in got["events"]:
        if e["alias"]:
            at = datetime.fromtimestamp(e["at"]).strftime("%Y-%m-%d %H:%M:%S")
            before = f"v{e['from_version']}" if e["from_version"] else "none"
            typer.echo(f"  {at}  {e['alias']}: {before} -> v{e['to_version']}  {e['message']}")
    say_next(f"runner models diff {model} A B", f"runner models rollback {model}")


@models_app.command("promote")
def promote(model: str = MODEL, version: int = typer.Argument(..., help="The version.", show_default=False),
            alias: str = typer.Option("champion", "--alias", help="The alias to move.")) -> None:
    """Point an alias at a version by hand (no gate)."""
    got = api(server(start=True).post, f"/models/{model}/promote", {"version": version, "alias": alias})
    typer.echo(f"{model}:{got['alias']} -> v{got['version']}")
    say_next(f"runner models show {model}")


@models_app.command("rollback")
def rollback(model: str = MODEL, alias: str = typer.Option("champion", "--alias", help="The alias to move back.")) \
        -> None:
    """Move the alias back to the version it pointed at before its last promotion."""
    got = api(server(start=True).post, f"/models/{model}/rollback", {"alias": alias})
    typer.echo(f"{model}:{got['alias']} rolled back from v{got['from']} to v{got['version']}")
    say_next(f"runner models show {model}")


@models_app.command("diff")
def diff(model: str = MODEL, a: int = typer.Argument(..., show_default=False),
         b: int = typer.Argument(..., show_default=False)) -> None:
    """Two versions side by side: test metrics, whether the data and test data are the same, the recipes' diff."""
    got = api(server().get, f"/models/{model}/diff", a=a, b=b)
    typer.echo(f"{'metric':<16}{'v' + str(a):>12}{'v' + str(b):>12}{'change':>12}")
    for k, m in got["metrics"].items():
        typer.echo(f"{k:<16}{_value(m['a']):>12}{_value(m['b']):>12}{_value(m.get('change')):>12}")
    typer.echo(f"same test data: {'yes' if got['same_test_data'] else 'no (the figures above are of other rows)'}; "
               f"same data: {'yes' if got['same_data'] else 'no'}; same recipe: "
               f"{'yes' if got['same_recipe'] else 'no'}")
    like = got.get("like_for_like")
    if like:
        typer.echo(f"both scored on {like['split']} ({like['rows']} rows):")
        for k in like["a"]:
            if isinstance(like["a"][k], float):
                typer.echo(f"  {k:<14}{_value(like['a'][k]):>12}{_value(like['b'].get(k)):>12}")
    if got["recipe_diff"]:
        typer.echo(got["recipe_diff"].rstrip("\n"))
