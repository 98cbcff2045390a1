"""The runner server's schedule routes (`runner schedule ...` talks to them), and its Scheduler, whose pass runs
with each dispatch pass. A schedule keeps its recipe's snapshot (local paths absolute, secrets as `${VAR}`
references); a fire queues it as the POST /jobs route does, the references filled from the server's environment
at that moment (never stored)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

from runner.api.auth import require
from runner.api.service import SVC
from runner.schedules import Scheduler, data_fingerprint, next_fires


class ScheduleRequest(BaseModel):
    recipe: str = Field(description="The recipe's YAML text, with a `schedule` section.")
    base_dir: str | None = Field(None, description="Folder that relative paths of the recipe are resolved from.")
    env: dict[str, str] = Field(default_factory=dict, description="Values for ${VAR} references; used to check the "
                                                                  "recipe now, never stored.")


def make_scheduler(svc) -> Scheduler:
    """The server's Scheduler over svc (runner.api.service.Service): a fire queues the recipe as POST /jobs does."""

    def recipe_of(s):
        return svc.parsed(s.recipe, s.base_dir, dict(os.environ), source=f"the recipe of schedule {s.id}")

    def submit(s, job_id: str, reason: str) -> None:
        try:
            svc.queue_recipe(recipe_of(s), job_id=job_id)
        except HTTPException as e:
            detail = e.detail
            if isinstance(detail, dict):
                detail = "; ".join(f"{p['path']}: {p['message']}" for p in detail.get("problems", [])) or str(detail)
            raise ValueError(detail) from None
        svc.store.note(job_id, f"queued by schedule {s.id}: {reason}")

    def cancel(job_id: str, reason: str) -> None:
        try:
            svc.stop_job(job_id, reason)
        except HTTPException:  # it ended meanwhile
            pass

    return Scheduler(svc.store, submit, cancel, clock=svc.clock,
                     fingerprint=lambda s: data_fingerprint(recipe_of(s)))


router = APIRouter(dependencies=[Depends(require)])


def described(svc, s, fires: int = 1) -> dict:
    out = s.to_json()
    out["what"] = s.describe()
    out["next"] = next_fires(s.cron, s.timezone, svc.clock(), 1) if s.cron and not s.paused else []
    out["fires"] = svc.scheduler.fires(s.id, limit=fires)
    return out


@router.post("/schedules", status_code=201)
def add(req: ScheduleRequest, svc=SVC) -> dict:
    recipe = svc.parsed(req.recipe, req.base_dir, req.env)
    if recipe.schedule is None:
        raise HTTPException(422, "the recipe has no `schedule` section: add one with `cron` (and `timezone`) "
                                 "or `on_data_change: true`")
    if recipe.model.token is not None and recipe.written_as("model", "token") is None:
        raise HTTPException(422, "model.token: a token written into a scheduled recipe would be kept by the "
                                 "server; write ${HF_TOKEN} and set HF_TOKEN in the server's environment")
    fingerprint = None
    if recipe.schedule.on_data_change:
        try:
            fingerprint = data_fingerprint(recipe)
        except Exception as e:  # noqa: BLE001 - a file that cannot be read, a hub that does not answer
            raise HTTPException(422, f"the data cannot be fingerprinted now: {e}") from None
    base = str(Path(req.base_dir).resolve()) if req.base_dir else None
    # kept as its snapshot: paths absolute, secrets as ${VAR} references (a pasted token redacted), never values
    s = svc.scheduler.add(recipe.name, recipe.snapshot_yaml(), base, recipe.schedule, fingerprint)
    svc.wake.set()
    return described(svc, s)


@router.get("/schedules")
def listing(limit: int = Query(500, ge=1, le=500), offset: int = Query(0, ge=0, le=2**62), svc=SVC) -> dict:
    every = svc.scheduler.all()
    return {"schedules": [described(svc, s) for s in every[offset:offset + limit]], "total": len(every),
            "limit": limit, "offset": offset}


@router.get("/schedules/{sched_id}")
def show(sched_id: str, fires: int = Query(20, ge=1, le=1000), svc=SVC) -> dict:
    s = svc.scheduler.get(sched_id)
    return {**described(svc, s, fires), "recipe": s.recipe}


@router.get("/schedules/{sched_id}/next")
def upcoming(sched_id: str, n: int = Query(5, ge=1, le=100), svc=SVC) -> dict:
    s = svc.scheduler.get(sched_id)
    if not s.cron:
        raise HTTPException(409, f"schedule {sched_id} has no cron: it fires when its data changes")
    return {"timezone": s.timezone, "next": next_fires(s.cron, s.timezone, svc.clock(), n)}


@router.post("/schedules/{sched_id}/pause")
def pause(sched_id: str, svc=SVC) -> dict:
    return described(svc, svc.scheduler.set_paused(sched_id, True))


@router.post("/schedules/{sched_id}/resume")
def resume(sched_id: str, svc=SVC) -> dict:
    return described(svc, svc.scheduler.set_paused(sched_id, False))


@router.post("/schedules/{sched_id}/trigger")
def trigger(sched_id: str, svc=SVC) -> dict:
    fire = svc.scheduler.trigger(sched_id)
    svc.wake.set()
    return fire


@router.delete("/schedules/{sched_id}")
def remove(sched_id: str, svc=SVC) -> dict:
    svc.scheduler.remove(sched_id)
    return {"removed": sched_id}
