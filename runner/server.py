"""The runner server's REST API over the job store (FastAPI). The CLI talks only to it.

Bound to 127.0.0.1 by default. Bound to any other address it refuses to start without a token, and with a token
every route but /health (and the login page) needs it: `Authorization: Bearer <token>` from programs, or the
session cookie that the dashboard's login form (or a one-time sign-in link, /login?code=...) sets. The local server
`runner submit` starts has a token of its own (runner.local), so that no other local user or process can use it.
The token is checked on the headers before a body is read, and bodies are bounded (MAX_BODY). Requests that change
something refuse to come from another site: a browser's `Sec-Fetch-Site` must be same-origin and its `Origin` this
server's, and a request that rides on the cookie must carry the page's CSRF token (`X-Runner-CSRF`). Bound to
loopback, requests must name a loopback host (no DNS rebinding of a page onto the local server).

Jobs live under <RUNNER_HOME>/artifacts/<job id>; ids are made here from the recipe's name (letters, digits, `-`,
`_`, `.`), and every path is checked to stay inside that root. Recipes are kept as their snapshot, secrets as
`${VAR}` references.

A thread runs the schedules' pass (`runner.schedules.Scheduler.tick`) and, with a Ray backend
(`runner.dispatch.RayJobs`), `Dispatcher.tick`, every `interval` seconds, and at
once after a submit, cancel or retry: queued jobs start when they fit, and their states, reasons and metrics come
back into the store. Without one, jobs stay QUEUED.

A job's log is <job dir>/job.log (the driver writes it); GET /jobs/{id}/logs returns it from an offset, or with
`follow=true` streams it as Server-Sent Events (`event: log`, one line of data each, `id:` the byte offset after
it) until the job has ended and the log is read to its end (`event: end`, the final state).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from jobs.jobdir import STATES, TERMINAL, JobState, lines_after, whole_lines
from jobs.recipe import NAME_RE, NAME_RULE, RecipeError, parse_recipe, shared_storage_problem
from runner import jobfiles
from runner.client import artifacts_root
from runner.jobfiles import inside, read_json
from runner.series import CHARTED, MAX_POINTS, thin
from runner.store import Store, StoreError, UnknownJob, eta_seconds


MAX_BODY = 2**20  # a request body: a recipe is at most 256 KiB (jobs.recipe.MAX_RECIPE_BYTES), sent as JSON
MAX_LOGIN_BODY = 4096
MAX_INT = 2**62  # offsets, ids and steps past this are no file's or table's: refused with a 422, never a 500


class RetryRequest(BaseModel):
    from_checkpoint: bool = Field(False, description="Go on from the job's last checkpoint instead of the start.")


class JobRequest(BaseModel):
    recipe: str = Field(description="The recipe's YAML text.")
    base_dir: str | None = Field(None, description="Folder that relative paths of the recipe are resolved from.")
    priority: int | None = Field(None, ge=-100, le=100)
    name: str | None = Field(None, description="Overrides the recipe's name.")
    env: dict[str, str] = Field(default_factory=dict, description="Values for the recipe's ${VAR} references; used "
                                                                  "to check the recipe, never stored.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Off loopback the server needs a token; raises ValueError with the fix."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to listen on {host} without a token: set RUNNER_TOKEN (for example "
                         f"RUNNER_TOKEN={secrets.token_urlsafe(24)}), or bind to 127.0.0.1")


SESSION_COOKIE = "runner_session"
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def derived(secret: str, purpose: str) -> str:
    """A value made from the token for one purpose (the session cookie, the CSRF token): neither gives the token."""
    return hmac.new(secret.encode(), purpose.encode(), "sha256").hexdigest()


def cross_site(request: Request) -> str | None:
    """Why a request that changes something looks sent by another site's page, or None. Browsers say where a
    request comes from (Sec-Fetch-Site, Origin); programs such as the CLI send neither and are let through to the
    token check."""
    site = request.headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return f"a {site} request (Sec-Fetch-Site); this server takes changes only from its own pages"
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
        return f"the request comes from {origin}, not from this server's pages"
    if origin == "null":
        return "the request comes from an opaque origin, not from this server's pages"
    return None


def create_app(home: Path, token: str | None = None, clock=time.time, backend=None,
               interval: float = 1.0, host: str | None = None, sse_max_s: float | None = None) -> FastAPI:
    """host: the address the server listens on (a loopback one turns on the Host check).
    sse_max_s: a log stream ends after this many seconds without `event: end` and the browser reconnects from
    the last id it saw (RUNNER_SSE_MAX_S, default 30): proxies drop idle long streams, and this tests reconnects."""
    import threading
    from contextlib import asynccontextmanager

    from runner.dispatch import Dispatcher, RayRefused, RayUnreachable

    home = Path(home)
    root = artifacts_root(home).resolve()
    root.mkdir(parents=True, exist_ok=True)
    store = Store(home / "runner.db", clock=clock)
    from runner.registry import Registry

    registry = Registry(store, clock=clock)

    def registered(job) -> None:
        version = registry.register(job)
        if version is not None:
            store.note(job.id, f"registered as {version['model']} v{version['version']}: {version['decision']}")

    def starting(job) -> None:  # the champion a registered model's job will be scored against (jobs.compare)
        spec = registry.champion_for(job)
        path = Path(job.job_dir) / "champion.json"
        if spec is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name("champion.json.tmp")
        tmp.unlink(missing_ok=True)  # a link planted there is removed, not written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(spec, indent=2))
        tmp.replace(path)

    from runner.cleanup import Retention, keep_from_env, remove_job

    dispatcher = Dispatcher(store, backend, on_success=registered, on_start=starting,
                            on_end=Retention(store, keep_from_env())) if backend is not None else None
    stop, wake = threading.Event(), threading.Event()

    def loop() -> None:
        while not stop.is_set():
            wake.wait(interval)
            wake.clear()
            if stop.is_set():
                break
            for what, tick in (("schedules", scheduler.tick), ("dispatch", dispatcher and dispatcher.tick)):
                try:
                    if tick:
                        tick()
                except Exception as e:  # noqa: BLE001 - a pass that failed: say so, try again next pass
                    print(f"{what}: {type(e).__name__}: {e}", flush=True)

    @asynccontextmanager
    async def lifespan(_app):
        thread = threading.Thread(target=loop, daemon=True, name="dispatch")
        thread.start()
        yield
        stop.set()
        wake.set()
        thread.join(timeout=10)

    app = FastAPI(title="runner", version="0.1", lifespan=lifespan)
    app.state.store = store
    app.state.dispatcher = dispatcher
    from runner.sessions import Sessions

    sessions = Sessions(clock)
    app.state.sessions = sessions
    csrf = derived(token or secrets.token_hex(32), "runner-csrf")
    sse_max_s = sse_max_s if sse_max_s is not None else float(os.environ.get("RUNNER_SSE_MAX_S", "30"))
    loopback_only = host is not None and is_loopback(host)

    def bearer_ok(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return bool(token) and given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(),
                                                                                     token.encode())

    def authorized(request: Request) -> bool:
        if not token or bearer_ok(request):
            return True
        return sessions.valid(request.cookies.get(SESSION_COOKIE))

    def auth(request: Request) -> None:
        if not authorized(request):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer $RUNNER_TOKEN")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Host check (loopback servers) and cross-site refusal for every request that changes something."""
        name = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]")
        if loopback_only and not is_loopback(name):
            return JSONResponse({"detail": f"host {name!r} is not served here: use 127.0.0.1 or localhost"},
                                status_code=421)
        # the body: bounded, and not read at all for a request without the token (checked on headers alone)
        size = request.headers.get("content-length")
        limit = MAX_LOGIN_BODY if request.url.path == "/login" else MAX_BODY
        if size is not None and not (size.isascii() and size.isdigit() and int(size) <= limit):
            return JSONResponse({"detail": f"the request body is {size[:20]} bytes; at most {limit:,} are taken "
                                           "here"}, status_code=413)
        if "transfer-encoding" in request.headers:  # a chunked body is bounded by nothing said before it comes
            return JSONResponse({"detail": "send the body with a Content-Length, not chunked"}, status_code=411)
        if token and request.headers.get("authorization") is not None and not bearer_ok(request):
            who = request.client.host if request.client else "?"
            wait = sessions.throttled(who)
            if wait:
                return JSONResponse({"detail": f"too many wrong tokens: try again in {wait:.0f} s"}, status_code=429)
            sessions.failed(who)
            return JSONResponse({"detail": "missing or wrong token: send Authorization: Bearer $RUNNER_TOKEN"},
                                status_code=401)
        if request.method in UNSAFE and token and request.url.path not in ("/login", "/logout") and \
                not authorized(request):
            return JSONResponse({"detail": "missing or wrong token: send Authorization: Bearer $RUNNER_TOKEN"},
                                status_code=401)
        if request.url.path in DOCS and not authorized(request):  # the API's own pages need the token too
            return JSONResponse({"detail": "missing or wrong token: send Authorization: Bearer $RUNNER_TOKEN"},
                                status_code=401)
        if request.method in UNSAFE:
            why = cross_site(request)
            if why is None and token and not bearer_ok(request) and authorized(request) and \
                    request.url.path not in ("/login", "/logout") and \
                    not hmac.compare_digest(request.headers.get("x-runner-csrf", "").encode(), csrf.encode()):
                why = "a request riding on the session cookie needs the page's X-Runner-CSRF token"
            if why:
                return JSONResponse({"detail": f"refused: {why}"}, status_code=403)
        return await call_next(request)

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

    def described(job, order: list[str] | None = None) -> dict:
        """A job as the API shows it: with its place in the queue and why it waits, while it is QUEUED.
        order: the queue's job ids, when the caller describes many jobs (read once, not once a job)."""
        out = job.to_json()
        now = clock()
        out["duration_s"] = round((job.ended_at or now) - job.started_at, 1) if job.started_at else None
        out["eta_s"] = eta_seconds(out["progress"]) if job.state in (JobState.RUNNING, JobState.RETRYING) else None
        if job.state == "QUEUED":
            order = order if order is not None else [j.id for j in store.queue()]
            waits = dispatcher.waiting.get(job.id) if dispatcher else None
            out["queue_position"] = order.index(job.id) + 1 if job.id in order else None
            out["waiting_for"] = waits[1] if waits else ("no Ray cluster attached" if dispatcher is None
                                                         else "the next dispatch pass")
        return out

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    def parsed(text: str, base_dir: str | None, env: dict, source: str = "recipe.yaml"):
        if base_dir is not None and (len(base_dir) > 4096 or any(ord(c) < 32 for c in base_dir)):
            raise HTTPException(422, f"base_dir {base_dir[:60]!r}: a folder's path, at most 4,096 characters, with no "
                                     "control characters")
        try:
            return parse_recipe(text, source=source, base_dir=Path(base_dir) if base_dir else None, env=env)
        except RecipeError as e:
            raise HTTPException(422, {"message": "the recipe has problems", "problems": [
                {"path": p.path, "line": p.line, "message": p.message} for p in e.problems]}) from None

    def queue_recipe(recipe, name: str | None = None, priority: int | None = None, job_id: str | None = None):
        """A checked recipe as a new QUEUED job: its folder, its snapshot, its row."""
        name = recipe.name if name is None else name
        fixed = job_id is not None  # a scheduled fire's id, made from its slot
        if not NAME_RE.fullmatch(name):
            raise HTTPException(422, f"name {name!r}: {NAME_RULE}")
        recipe = recipe.model_copy(update={"name": name})
        job_id = job_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(clock()))}-{secrets.token_hex(2)}"
        job_dir = (root / job_id).resolve()
        if job_dir.parent != root:  # the name rules make this impossible; the check keeps it so
            raise HTTPException(422, f"name {name!r} would leave the artifacts folder")
        res = recipe.resources
        if dispatcher is not None:
            why = dispatcher.refusal(need_of_recipe(recipe))
            if why:
                raise HTTPException(422, f"refused: the job {why}")
            storage = shared_storage_problem(root, len(dispatcher.backend.nodes()))
            if storage:
                raise HTTPException(422, f"refused: {storage}")
        job_dir.mkdir(exist_ok=fixed)  # a fire's folder may be there from a server that died before its row
        snapshot = recipe.snapshot_yaml()
        (job_dir / "recipe.yaml").write_text(snapshot, encoding="utf-8")
        priority = priority if priority is not None else recipe.resources.priority
        job = store.add_job(job_id, name, snapshot, str(job_dir), res.workers, res.cpus_per_worker,
                            res.gpus_per_worker, priority=priority)
        wake.set()
        return job

    @app.post("/jobs", status_code=201, dependencies=[Depends(auth)])
    def create(req: JobRequest) -> dict:
        recipe = parsed(req.recipe, req.base_dir, req.env)
        if recipe.model.token is not None and not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}",
                                                               recipe._secrets.get(("model", "token"), "")):
            # kept as its snapshot the token would be `**********`, and the job would run with that
            raise HTTPException(422, "model.token: a token written into the recipe is neither kept nor sent; write "
                                     "${HF_TOKEN} and set HF_TOKEN where the jobs run")
        return described(queue_recipe(recipe, req.name, req.priority))

    def listing(state: str | None, name: str | None, q: str | None, limit: int, offset: int) -> dict:
        if state is not None and state.upper() not in STATES:
            raise HTTPException(422, f"state {state!r}: one of {', '.join(STATES)}")
        state = state.upper() if state else None
        jobs = store.list(state=state, name=name, limit=limit, offset=offset, text=q)
        order = [j.id for j in store.queue()] if any(j.state == "QUEUED" for j in jobs) else []
        return {"jobs": [described(j, order) for j in jobs], "limit": limit, "offset": offset,
                "total": store.count(state=state, name=name, text=q), "counts": store.counts()}

    app.state.listing = listing

    @app.get("/jobs", dependencies=[Depends(auth)])
    def list_jobs(state: str | None = Query(None), name: str | None = Query(None),
                  q: str | None = Query(None, description="A part of the id, name or model."),
                  limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_INT)) -> dict:
        return listing(state, name, q, limit, offset)

    @app.get("/jobs/{job_id}", dependencies=[Depends(auth)])
    def get_job(job_id: str) -> dict:
        job = store.get(job_id)
        out = described(job)
        out["attempts"] = store.attempts(job_id)
        result = read_json(job.job_dir, "eval.json") if job.state == "SUCCEEDED" else None
        if result is not None:
            out["result"] = result
        attempt = store.attempt(job_id)
        fresh = [a["started_at"] for a in out["attempts"] if not a["resume"]]  # attempts that started over
        since = max(fresh) if fresh else 0  # this training run's: not those of a run a retry started over from
        out["warnings"] = [{"at": e["at"], "message": e["message"]} for e in store.events(job_id, level="warning")
                           if e["at"] >= since]
        if ray_url and attempt and attempt.get("submission"):
            out["ray_url"] = f"{ray_url}/#/jobs/{attempt['submission']}"
        return out

    ray_url = getattr(backend, "address", None)
    app.state.described = described
    app.state.ray_url = ray_url

    @app.get("/jobs/{job_id}/series", dependencies=[Depends(auth)])
    def series(job_id: str, max_points: int = Query(MAX_POINTS, ge=10, le=MAX_POINTS)) -> dict:
        """The job's curves: for each split, each charted figure thinned to at most max_points points."""
        store.get(job_id)
        return {split: thin(store.metrics_columns(job_id, split, keys), max_points)
                for split, keys in CHARTED.items()}

    @app.get("/jobs/{job_id}/checkpoints", dependencies=[Depends(auth)])
    def checkpoints(job_id: str) -> dict:
        """The job's Ray Train checkpoints (step, bytes, time written), and the best model kept beside them."""
        job_dir = Path(store.get(job_id).job_dir)
        out = []
        found = (job_dir / "checkpoints").glob("checkpoint_*") if not (job_dir / "checkpoints").is_symlink() else []
        for d in sorted(d for d in found if d.is_dir() and not d.is_symlink())[:1000]:
            rel = f"checkpoints/{d.name}"
            step = (read_json(job_dir, f"{rel}/step.json", 4096) or {}).get("step")
            files = jobfiles.listing(d, skip=())
            out.append({"name": d.name, "step": step if isinstance(step, int) else None,
                        "bytes": sum(f["bytes"] for f in files),
                        "written_at": max((_mtime(d / f["path"]) for f in files), default=None)})
        return {"checkpoints": out}

    @app.get("/jobs/{job_id}/files/{path:path}", dependencies=[Depends(auth)])
    def download(job_id: str, path: str):
        target = inside(store.get(job_id).job_dir, path)
        if target is None:
            raise HTTPException(404, f"job {job_id} has no file {path!r}")
        return FileResponse(target, filename=target.name)

    listed: dict[str, tuple[tuple, dict]] = {}  # an ended job's artifacts, by id: its folder no longer changes

    @app.get("/jobs/{job_id}/artifacts", dependencies=[Depends(auth)])
    def artifacts(job_id: str) -> dict:
        """The job folder's files (path, bytes), the test metrics and the export's checks where there are any.
        Links are left out and never followed; an ended job's answer is kept until its state changes."""
        job = store.get(job_id)
        key = (job.state, job.attempt, job.ended_at, _mtime(Path(job.job_dir)), _mtime(Path(job.job_dir) / "exports"))
        if job_id in listed and listed[job_id][0] == key:
            return listed[job_id][1]
        job_dir = Path(job.job_dir)
        out: dict = {"job_dir": str(job_dir), "files": jobfiles.listing(job_dir)}
        for name, rel in (("eval", "eval.json"), ("export", "onnx/export_report.json")):
            found = read_json(job_dir, rel)
            if found is not None:
                out[name] = found
        if job.state in TERMINAL:
            if len(listed) > 1000:
                listed.clear()
            listed[job_id] = (key, out)
        return out

    streams = {"open": 0}
    MAX_STREAMS = int(os.environ.get("RUNNER_MAX_LOG_STREAMS", "64"))

    @app.get("/jobs/{job_id}/logs", dependencies=[Depends(auth)])
    async def logs(request: Request, job_id: str, offset: int = Query(0, ge=0, le=MAX_INT), follow: bool = False):
        job_dir = (await asyncio.to_thread(store.get, job_id)).job_dir

        def log_path() -> Path | None:  # where job.log is a link, a pipe or a folder, there is no log to show
            return inside(job_dir, "job.log")

        if not follow:
            path = await asyncio.to_thread(log_path)
            text, end = await asyncio.to_thread(whole_lines, path, offset, 1 << 20) if path else ("", offset)
            return {"text": text, "offset": end}
        if streams["open"] >= MAX_STREAMS:
            raise HTTPException(503, f"{MAX_STREAMS} log streams are open on this server; try again later "
                                     "(RUNNER_MAX_LOG_STREAMS)")
        last = request.headers.get("last-event-id", "")  # a browser's EventSource reconnecting: go on from there
        at = int(last) if last.isascii() and last.isdigit() and len(last) < 19 else offset
        until = time.monotonic() + sse_max_s

        def read(at: int) -> tuple[bool, list]:  # the store and the file are read off the event loop
            ended = store.get(job_id).state in TERMINAL  # read before the file: its last lines come after
            path = log_path()
            return ended, lines_after(path, at, 1 << 20) if path else []

        streams["open"] += 1  # counted at once: two requests cannot both pass the check above

        async def stream():
            nonlocal at
            try:
                yield "retry: 1000\n\n"
                while True:
                    if time.monotonic() > until:  # the client reconnects with Last-Event-ID
                        return
                    ended, lines = await asyncio.to_thread(read, at)
                    for at, line in lines:  # SSE data cannot hold a bare CR (a progress bar's): it would split it
                        yield f"id: {at}\nevent: log\ndata: {line.replace(chr(13), '')}\n\n"
                    if ended and not lines:
                        state = (await asyncio.to_thread(store.get, job_id)).state
                        yield f"event: end\ndata: {state}\n\n"
                        return
                    await asyncio.sleep(0.3)
            finally:
                streams["open"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/jobs/{job_id}/recipe", dependencies=[Depends(auth)])
    def get_recipe(job_id: str) -> dict:
        return {"recipe": store.get(job_id).recipe}

    @app.get("/jobs/{job_id}/events", dependencies=[Depends(auth)])
    def events(job_id: str, after: int = Query(0, ge=0, le=MAX_INT),
               limit: int = Query(1000, ge=1, le=10_000)) -> dict:
        """The job's events after the event id `after`, at most `limit` (the next page: after the last id)."""
        store.get(job_id)
        return {"events": store.events(job_id, after, limit=limit)}

    @app.get("/jobs/{job_id}/metrics", dependencies=[Depends(auth)])
    def metrics(job_id: str, split: str | None = None, after_step: int = Query(0, ge=0, le=MAX_INT),
                limit: int = Query(10_000, ge=1, le=100_000)) -> dict:
        """The job's figures after step `after_step`, at most `limit` records (the next page: after the last step)."""
        store.get(job_id)
        return {"metrics": store.metrics(job_id, split=split, after_step=after_step, limit=limit)}

    def stop_job(job_id: str, reason: str = "cancelled by the user"):
        job = store.get(job_id)
        if job.state in TERMINAL:
            raise HTTPException(409, f"job {job_id} has already ended ({job.state})")
        if dispatcher is not None and job.state != "QUEUED":
            out = dispatcher.cancel(job)
        else:
            out = store.set_state(job_id, "CANCELLED", reason=reason, expect=job.state)
        wake.set()
        return out

    @app.delete("/jobs/{job_id}", dependencies=[Depends(auth)])
    def remove(job_id: str) -> dict:
        """An ended job's folder and rows; refused (409) while it runs or when it is a registered model version."""
        return remove_job(store, job_id, root)

    @app.post("/jobs/{job_id}/cancel", dependencies=[Depends(auth)])
    def cancel(job_id: str) -> dict:
        return stop_job(job_id).to_json()

    @app.post("/jobs/{job_id}/retry", dependencies=[Depends(auth)])
    def retry(job_id: str, req: RetryRequest | None = None) -> dict:
        job = store.get(job_id)
        if job.state not in ("FAILED", "CANCELLED"):
            raise HTTPException(409, f"job {job_id} is {job.state}; only a FAILED or CANCELLED job can be retried")
        resume = bool(req and req.from_checkpoint)
        how = "from its last checkpoint" if resume else "from the start"
        out = store.set_state(job_id, "QUEUED", message=f"retry {how} (attempt {job.attempt + 1})", expect=job.state,
                              resume=resume)
        wake.set()
        return described(out)

    @app.get("/cluster", dependencies=[Depends(auth)])
    def cluster() -> dict:
        """Each node with its CPUs, GPUs and memory, what is free, and which of the runner's jobs holds what."""
        if dispatcher is None:
            raise HTTPException(503, "no Ray cluster is attached to this server (start it with --ray URL)")
        nodes = backend.nodes()
        free = {n.id: f for n, f in zip(nodes, dispatcher.free(nodes))}
        detail = {n["id"]: n for n in backend.details()["nodes"]} if hasattr(backend, "details") else {}
        jobs = {dispatcher.submission(j): j.id for j in dispatcher.active()}
        out = []
        for n in nodes:
            d = detail.get(n.id, {})
            held = [{"job": jobs.get(h["submission"]), "submission": h["submission"], "cpus": h["cpus"],
                     "gpus": h["gpus"]} for h in d.get("held", [])]
            out.append({"id": n.id, "host": d.get("host"), "ip": d.get("ip"), "head": d.get("head", False),
                        "cpus": n.cpus, "gpus": n.gpus, "free_cpus": free[n.id].cpus, "free_gpus": free[n.id].gpus,
                        "memory_bytes": n.memory, "mem_total": d.get("mem_total"), "mem_used": d.get("mem_used"),
                        "gpu_name": d.get("gpu_name"), "gpu_memory_bytes": d.get("gpu_memory_bytes"), "held": held})
        return {"nodes": out, "ray_url": ray_url,
                "cpus": sum(n.cpus for n in nodes), "gpus": sum(n.gpus for n in nodes),
                "free_cpus": sum(f.cpus for f in free.values()), "free_gpus": sum(f.gpus for f in free.values())}

    @app.get("/metrics", dependencies=[Depends(auth)])
    def prometheus():
        from runner.prometheus import exposition

        body, kind = exposition(store)
        return Response(body, media_type=kind)

    from runner.model_api import model_routes
    from runner.schedule_api import schedule_routes

    model_routes(app, registry, auth)

    scheduler = schedule_routes(app, store, auth, parsed, queue_recipe, stop_job, clock, wake)
    from runner.dashboard import pages

    app.include_router(pages(app, store, authorized, csrf, sessions, token))

    @app.post("/login/code", dependencies=[Depends(auth)])
    def login_code(request: Request) -> dict:
        """A one-time sign-in code for the dashboard (`runner dashboard` opens /login?code=...): used once, valid
        for ten minutes; only a holder of the token (not a session) gets one."""
        if not bearer_ok(request):
            raise HTTPException(403, "a sign-in code is given for the token (Authorization: Bearer), not a session")
        from runner.sessions import CODE_S

        return {"code": sessions.code(), "expires_in": CODE_S}

    return app


def _mtime(path: Path) -> float | None:
    try:
        return path.lstat().st_mtime
    except OSError:
        return None


def need_of_recipe(recipe):
    from runner.queue import Need

    r = recipe.resources
    return Need(r.workers, r.cpus_per_worker, r.gpus_per_worker)


def serve(home: Path, host: str = "127.0.0.1", port: int = 8642, token: str | None = None,
          ray_dashboard: str | None = None, interval: float = 0.25) -> None:
    check_bind(host, token)
    import uvicorn

    from runner.dispatch import RayJobs

    backend = RayJobs(ray_dashboard, os.environ.get("RAY_AUTH_TOKEN")) if ray_dashboard else None
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
    a = ap.parse_args(argv)
    home = Path(os.environ.get("RUNNER_HOME") or Path.home() / ".runner")
    try:
        from runner.cleanup import keep_from_env

        keep_from_env()  # a bad RUNNER_KEEP_CHECKPOINTS is refused before anything starts
        serve(home, a.host, a.port, os.environ.get("RUNNER_TOKEN") or None, a.ray, a.interval)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
