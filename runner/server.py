"""The runner server: a FastAPI app over the job store, assembled from the routers of runner/api/. The CLI talks
only to it.

Bound to 127.0.0.1 by default. Bound to any other address it refuses to start without a token (runner/api/auth.py
says what the token guards and how). The local server `runner submit` starts has a token of its own (runner.local),
so that no other local user or process can use it.

Jobs live under <RUNNER_HOME>/artifacts/<job id>; ids are made here from the recipe's name (letters, digits, `-`,
`_`, `.`), and every path is checked to stay inside that root. Recipes are kept as their snapshot, secrets as
`${VAR}` references.

A thread runs the schedules' pass (`runner.schedules.Scheduler.tick`) and, with a Ray backend
(`runner.dispatch.RayJobs`), `Dispatcher.tick`, every `interval` seconds, and at once after a submit, cancel or
retry: queued jobs start when they fit, and their states, reasons and metrics come back into the store. Without
one, jobs stay QUEUED.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from runner.api.auth import SESSION_COOKIE, Gate, check_bind, is_loopback
from jobs.jobdir import runner_home
from runner.api import jobs
from runner.api.service import Service
from runner.store import StoreError, UnknownJob

__all__ = ["SESSION_COOKIE", "check_bind", "create_app", "main", "serve"]


def create_app(home: Path, token: str | None = None, clock=time.time, backend=None,
               interval: float = 1.0, host: str | None = None, sse_max_s: float | None = None) -> FastAPI:
    """host: the address the server listens on (a loopback one turns on the Host check).
    sse_max_s: a log stream ends after this many seconds without `event: end` and the browser reconnects from
    the last id it saw (RUNNER_SSE_MAX_S, default 30): proxies drop idle long streams, and this tests reconnects."""
    from runner.api import auth, models, pages, schedules
    from runner.sessions import Sessions

    svc = Service(home, clock, backend)
    gate = Gate(token, Sessions(clock), loopback_only=host is not None and is_loopback(host))
    svc.sse_max_s = sse_max_s if sse_max_s is not None else float(os.environ.get("RUNNER_SSE_MAX_S", "30"))

    app = FastAPI(title="runner", version="0.1", lifespan=svc.lifespan(interval))
    app.state.service, app.state.gate = svc, gate  # what the routes' dependencies hand them
    app.state.store, app.state.dispatcher, app.state.sessions = svc.store, svc.dispatcher, gate.sessions
    app.middleware("http")(gate.guard)
    _errors(app)
    svc.scheduler = schedules.make_scheduler(svc)
    for router in (jobs.health, jobs.router, models.router, schedules.router, pages.router, auth.login, auth.codes):
        app.include_router(router)
    return app


def _errors(app: FastAPI) -> None:
    """The store's and Ray's refusals as HTTP answers with their words, never a 500."""
    from runner.dispatch import RayRefused, RayUnreachable
    from runner.registry import UnknownModel
    from runner.schedules import UnknownSchedule

    @app.exception_handler(UnknownModel)
    @app.exception_handler(UnknownSchedule)
    @app.exception_handler(UnknownJob)
    async def _unknown(_, e: UnknownJob):
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(StoreError)
    async def _refused(_, e: StoreError):
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(RayRefused)
    async def _ray_said_no(_, e: RayRefused):
        return JSONResponse({"detail": f"the Ray cluster refused: {str(e).splitlines()[0][:300]}"}, status_code=502)

    @app.exception_handler(RayUnreachable)
    async def _no_ray(_, e: RayUnreachable):
        return JSONResponse({"detail": f"{e}; is it running? (`runner server start` starts the local one)"},
                            status_code=503)


def serve(home: Path, host: str = "127.0.0.1", port: int = 8642, token: str | None = None,
          ray_dashboard: str | None = None, interval: float = 0.25, ray_gcs: str | None = None) -> None:
    check_bind(host, token)
    import uvicorn

    from runner.dispatch import RayJobs

    if ray_gcs and os.environ.get("RUNNER_CLUSTER_CONFIG"):  # a config that cannot give node types: said now
        from runner.elastic import read_config

        read_config(os.environ["RUNNER_CLUSTER_CONFIG"])
    backend = RayJobs(ray_dashboard, os.environ.get("RAY_AUTH_TOKEN"), gcs=ray_gcs,
                      cluster_config=os.environ.get("RUNNER_CLUSTER_CONFIG") or None) if ray_dashboard else None
    uvicorn.run(create_app(home, token, backend=backend, interval=interval, host=host), host=host, port=port,
                log_level="warning")


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.server [--host H] [--port P]`; RUNNER_HOME and RUNNER_TOKEN from the environment."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m runner.server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8642)
    ap.add_argument("--ray", default=os.environ.get("RAY_DASHBOARD_ADDRESS"),
                    help="The Ray dashboard's address (http://HEAD:8265); without it jobs stay QUEUED.")
    ap.add_argument("--interval", type=float, default=0.25, help="Seconds between dispatch passes.")
    ap.add_argument("--ray-gcs", default=os.environ.get("RAY_GCS_ADDRESS"),
                    help="The Ray GCS's address (HEAD:6379): free capacity as Ray sees it (other users count), the "
                         "autoscaler's node types and resource requests, drained nodes.")
    a = ap.parse_args(argv)
    home = runner_home()
    try:
        from runner.cleanup import keep_from_env

        keep_from_env()  # a bad RUNNER_KEEP_CHECKPOINTS is refused before anything starts
        serve(home, a.host, a.port, os.environ.get("RUNNER_TOKEN") or None, a.ray, a.interval, a.ray_gcs)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
