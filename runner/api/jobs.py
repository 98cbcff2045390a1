"""The routes about jobs (submit, list, one job, its curves, checkpoints, files, artifacts, log, events, metrics,
remove, cancel, retry), the cluster, /health and Prometheus' /metrics.

A job's log is <job dir>/job.log (the driver writes it); GET /jobs/{id}/logs returns it from an offset, or with
`follow=true` streams it as Server-Sent Events (`event: log`, one line of data each, `id:` the byte offset after
it) until the job has ended and the log is read to its end (`event: end`, the final state).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from jobs.jobdir import TERMINAL, JobState, lines_after, whole_lines
from runner import jobfiles
from runner.api.auth import require
from runner.api.service import SVC, Service
from runner.jobfiles import inside, read_json
from runner.series import CHARTED, MAX_POINTS, thin

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


health = APIRouter()
router = APIRouter(dependencies=[Depends(require)])


def _mtime(path: Path) -> float | None:
    try:
        return path.lstat().st_mtime
    except OSError:
        return None


@health.get("/health")
def is_up() -> dict:
    return {"ok": True}


@router.post("/jobs", status_code=201)
def create(req: JobRequest, svc: Service = SVC) -> dict:
    recipe = svc.parsed(req.recipe, req.base_dir, req.env)
    if recipe.model.token is not None and not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}",
                                                           recipe.written_as("model", "token") or ""):
        # kept as its snapshot the token would be `**********`, and the job would run with that
        raise HTTPException(422, "model.token: a token written into the recipe is neither kept nor sent; write "
                                 "${HF_TOKEN} and set HF_TOKEN where the jobs run")
    return svc.described(svc.queue_recipe(recipe, req.name, req.priority))


@router.get("/jobs")
def list_jobs(state: str | None = Query(None), name: str | None = Query(None),
              q: str | None = Query(None, description="A part of the id, name or model."),
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_INT),
              svc: Service = SVC) -> dict:
    return svc.listing(state, name, q, limit, offset)


@router.get("/jobs/{job_id}")
def get_job(job_id: str, svc: Service = SVC) -> dict:
    store = svc.store
    job = store.get(job_id)
    out = svc.described(job)
    out["attempts"] = store.attempts(job_id)
    result = read_json(job.job_dir, "eval.json") if job.state == JobState.SUCCEEDED else None
    if result is not None:
        out["result"] = result
    attempt = store.attempt(job_id)
    fresh = [a["started_at"] for a in out["attempts"] if not a["resume"]]  # attempts that started over
    since = max(fresh) if fresh else 0  # this training run's: not those of a run a retry started over from
    out["warnings"] = [{"at": e["at"], "message": e["message"]} for e in store.events(job_id, level="warning")
                       if e["at"] >= since]
    if svc.ray_url and attempt and attempt.get("submission"):
        out["ray_url"] = f"{svc.ray_url}/#/jobs/{attempt['submission']}"
    return out


@router.get("/jobs/{job_id}/series")
def series(job_id: str, max_points: int = Query(MAX_POINTS, ge=10, le=MAX_POINTS), svc: Service = SVC) -> dict:
    """The job's curves: for each split, each charted figure thinned to at most max_points points."""
    store = svc.store
    store.get(job_id)
    return {split: thin(store.metrics_columns(job_id, split, keys), max_points)
            for split, keys in CHARTED.items()}


@router.get("/jobs/{job_id}/checkpoints")
def checkpoints(job_id: str, svc: Service = SVC) -> dict:
    """The job's Ray Train checkpoints (step, bytes, time written), and the best model kept beside them."""
    job_dir = Path(svc.store.get(job_id).job_dir)
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


@router.get("/jobs/{job_id}/files/{path:path}")
def download(job_id: str, path: str, svc: Service = SVC):
    target = inside(svc.store.get(job_id).job_dir, path)
    if target is None:
        raise HTTPException(404, f"job {job_id} has no file {path!r}")
    return FileResponse(target, filename=target.name)


@router.get("/jobs/{job_id}/artifacts")
def artifacts(job_id: str, svc: Service = SVC) -> dict:
    """The job folder's files (path, bytes), the test metrics and the export's checks where there are any.
    Links are left out and never followed; an ended job's answer is kept until its state changes."""
    job, listed = svc.store.get(job_id), svc.artifacts_cache
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


@router.get("/jobs/{job_id}/recipe")
def get_recipe(job_id: str, svc: Service = SVC) -> dict:
    return {"recipe": svc.store.get(job_id).recipe}


@router.get("/jobs/{job_id}/events")
def events(job_id: str, after: int = Query(0, ge=0, le=MAX_INT),
           limit: int = Query(1000, ge=1, le=10_000), svc: Service = SVC) -> dict:
    """The job's events after the event id `after`, at most `limit` (the next page: after the last id)."""
    svc.store.get(job_id)
    return {"events": svc.store.events(job_id, after, limit=limit)}


@router.get("/jobs/{job_id}/metrics")
def metrics(job_id: str, split: str | None = None, after_step: int = Query(0, ge=0, le=MAX_INT),
            limit: int = Query(10_000, ge=1, le=100_000), svc: Service = SVC) -> dict:
    """The job's figures after step `after_step`, at most `limit` records (the next page: after the last step)."""
    svc.store.get(job_id)
    return {"metrics": svc.store.metrics(job_id, split=split, after_step=after_step, limit=limit)}


@router.delete("/jobs/{job_id}")
def remove(job_id: str, svc: Service = SVC) -> dict:
    """An ended job's folder and rows; refused (409) while it runs or when it is a registered model version."""
    from runner.cleanup import remove_job

    return remove_job(svc.store, job_id, svc.root)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, svc: Service = SVC) -> dict:
    return svc.stop_job(job_id).to_json()


@router.post("/jobs/{job_id}/retry")
def retry(job_id: str, req: RetryRequest | None = None, svc: Service = SVC) -> dict:
    store = svc.store
    job = store.get(job_id)
    if job.kind == "trial":
        raise HTTPException(409, f"{job_id} is a trial of sweep {job.parent}: retry the sweep (runner retry "
                                 f"{job.parent} runs only the trials that did not finish)")
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise HTTPException(409, f"job {job_id} is {job.state}; only a FAILED or CANCELLED job can be retried")
    resume = bool(req and req.from_checkpoint) or job.kind == "sweep"
    how = "from its last checkpoint" if resume else "from the start"
    if job.kind == "sweep":  # a sweep's retry is its search going on: ended trials stand, the others resume
        how = "of the trials that did not finish, each from its last checkpoint"
    out = store.set_state(job_id, JobState.QUEUED, message=f"retry {how} (attempt {job.attempt + 1})",
                          expect=job.state, resume=resume)
    svc.wake.set()
    return svc.described(out)


@router.get("/jobs/{job_id}/logs")
async def logs(request: Request, job_id: str, offset: int = Query(0, ge=0, le=MAX_INT), follow: bool = False,
               svc: Service = SVC):
    """A job's log, from an offset or followed live (at most RUNNER_MAX_LOG_STREAMS streams at once)."""
    store, streams, most = svc.store, svc.streams, svc.max_streams
    job = await asyncio.to_thread(store.get, job_id)
    job_dir = job.job_dir
    # a sweep's trial has no driver of its own (its lines are in the sweep's job.log): its log is train.log
    name = "train.log" if job.kind == "trial" else "job.log"

    def log_path() -> Path | None:  # where the log is a link, a pipe or a folder, there is no log to show
        return inside(job_dir, name)

    if not follow:
        path = await asyncio.to_thread(log_path)
        text, end = await asyncio.to_thread(whole_lines, path, offset, 1 << 20) if path else ("", offset)
        return {"text": text, "offset": end}
    if streams["open"] >= most:
        raise HTTPException(503, f"{most} log streams are open on this server; try again later "
                                 "(RUNNER_MAX_LOG_STREAMS)")
    last = request.headers.get("last-event-id", "")  # a browser's EventSource reconnecting: go on from there
    at = int(last) if last.isascii() and last.isdigit() and len(last) < 19 else offset
    until = time.monotonic() + svc.sse_max_s

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


@router.get("/cluster")
def cluster(svc: Service = SVC) -> dict:
    """Each node with its CPUs, GPUs and memory, what is free, which of the runner's jobs holds what; where the
    server reads Ray's GCS, also each node's type and whether it is drained, the node types the autoscaler can start
    (how many could still start), the cluster's resource request and which queued job each node asked for serves."""
    dispatcher, backend = svc.dispatcher, svc.backend
    if dispatcher is None:
        raise HTTPException(503, "no Ray cluster is attached to this server (start it with --ray URL)")
    view = dispatcher.view()
    nodes = view.nodes if view else backend.nodes()
    free = {n.id: f for n, f in zip(nodes, view.free if view else dispatcher.free(nodes))}
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
                    "gpu_name": d.get("gpu_name"), "gpu_memory_bytes": d.get("gpu_memory_bytes"), "held": held,
                    "type": n.type, "draining": bool(view and n.id in view.draining),
                    "idle_s": round(view.idle_s.get(n.id, 0.0), 1) if view else None})
    return {"nodes": out, "ray_url": svc.ray_url,
            "cpus": sum(n.cpus for n in nodes), "gpus": sum(n.gpus for n in nodes),
            "free_cpus": sum(f.cpus for f in free.values()), "free_gpus": sum(f.gpus for f in free.values()),
            "autoscaler": bool(view and view.types),
            "node_types": [{"name": t.name, "cpus": t.cpus, "gpus": t.gpus, "max": t.max_count, "now": t.count,
                            "could_start": t.could_start if t.max_count >= 0 else None}
                           for t in (view.types if view else [])],
            "pending_launches": dict(view.pending) if view else {},
            "resource_request": view.request if view else [],
            "requests": [{"job": job_id, "node_types": kinds} for job_id, kinds in dispatcher.requested_for.items()]}


@router.get("/metrics")
def prometheus(svc: Service = SVC):
    from runner.prometheus import exposition

    body, kind = exposition(svc.store)
    return Response(body, media_type=kind)

