"""`runner server start|stop|status` and `runner cluster status|down`: the local runner server and the Ray
cluster behind it."""

from __future__ import annotations

import json
import os

import typer

from runner.cli.common import EXIT_FAILED, api, fail, say_next, server
from runner.client import Client, ClientError, connect, runner_home

server_app = typer.Typer(help="The local runner server: start, stop, status.", no_args_is_help=True)
cluster_app = typer.Typer(help="The Ray cluster behind the server: status, and `down` for the local one.",
                          no_args_is_help=True)


@server_app.command("start")
def server_start() -> None:
    """Start the local runner server and Ray head in the background (bound to 127.0.0.1), where not running."""
    if os.environ.get("RUNNER_SERVER"):
        fail(f"RUNNER_SERVER is set ({os.environ['RUNNER_SERVER']}): the CLI uses that server and starts none "
              "here; unset it to use a local one", code=EXIT_FAILED)
    client = server(start=True)
    typer.echo(f"runner server: {client.url}   (log: {runner_home() / 'server.log'})")
    say_next("runner submit recipe.yaml", "runner server status")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local runner server. Running jobs go on in Ray; a later start picks them up again."""
    from runner.local import stop

    typer.echo("runner server stopped" if stop(runner_home(), "server") else "no local runner server was running")
    say_next("runner server start", "runner cluster down")


@server_app.command("status")
def server_status() -> None:
    """Where the server is, whether it answers, and what the cluster behind it has."""
    from runner.local import alive, read_state

    try:
        client = connect(autostart=False)
    except ClientError as e:
        ray = read_state(runner_home()).get("ray") or {}
        typer.echo(str(e))
        if alive(ray.get("pid")):
            typer.echo(f"local Ray head: running, dashboard {ray['dashboard']}")
        raise typer.Exit(EXIT_FAILED) from None
    api(client.get, "/health")
    typer.echo(f"runner server: {client.url}, answering")
    _cluster_lines(client)
    say_next("runner list", "runner server stop")


def _cluster_lines(client: Client) -> None:
    try:
        c = client.get("/cluster")
    except ClientError as e:
        typer.echo(f"cluster: {e}")
        return
    typer.echo(f"cluster: {len(c['nodes'])} node(s), CPUs {c['free_cpus']:g} free of {c['cpus']:g}, "
               f"GPUs {c['free_gpus']:g} free of {c['gpus']:g}")
    for n in c["nodes"]:
        kind = f"  ({n['gpu_name'] or 'GPU'}, {n['gpu_memory_bytes'] / 2**30:.1f} GiB each)" \
            if n.get("gpu_memory_bytes") else ""
        kind += f"  type {n['type']}" if n.get("type") else ""
        kind += "  DRAINING" if n.get("draining") else ""
        typer.echo(f"  {n['id'][:12]}  CPUs {n['free_cpus']:g}/{n['cpus']:g}  GPUs {n['free_gpus']:g}/{n['gpus']:g}"
                   f"{kind}")
    if not c.get("node_types"):
        return
    asked: dict[str, list[str]] = {}
    for r in c.get("requests") or []:
        for t in r["node_types"]:
            asked.setdefault(t, []).append(r["job"])
    typer.echo("node types the autoscaler can add:")
    for t in c["node_types"]:
        top = "no limit" if t["max"] < 0 else f"max {t['max']}"
        could = "no limit" if t["could_start"] is None else str(t["could_start"])
        starting = (c.get("pending_launches") or {}).get(t["name"])
        typer.echo(f"  {t['name']}  {t['cpus']:g} CPUs, {t['gpus']:g} GPUs each  {t['now']} now ({top})"
                   f"{f', {starting} starting' if starting else ''}, {could} could still start"
                   + (f"; asked for by {', '.join(asked[t['name']])}" if asked.get(t["name"]) else ""))
    bundles = sum(r["count"] for r in c.get("resource_request") or [])
    typer.echo(f"resource request: {bundles} bundle{'s' if bundles != 1 else ''} (those in use included)" if bundles
               else "resource request: none (idle nodes go after the autoscaler's idle timeout)")


@cluster_app.command("status")
def cluster_status(as_json: bool = typer.Option(False, "--json", help="The server's answer as JSON.")) -> None:
    """The nodes of the Ray cluster, with CPUs and GPUs in total and free; with an autoscaler, its node types, how
    many nodes of each could still start, the resource request and the queued jobs it serves."""
    client = server()
    if as_json:
        typer.echo(json.dumps(api(client.get, "/cluster"), indent=2))
        return
    api(client.get, "/cluster")
    _cluster_lines(client)


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop the local Ray head, and the jobs running on it (the server marks them FAILED)."""
    from runner.local import stop

    typer.echo("local Ray head stopped" if stop(runner_home(), "ray") else "no local Ray head was running")
    say_next("runner server start   (starts it again)")
