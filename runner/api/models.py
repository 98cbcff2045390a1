"""The runner server's model registry routes (`runner models ...` talks to them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from runner.api.auth import require
from runner.api.service import current
from runner.registry import CHAMPION, Registry


class AliasRequest(BaseModel):
    version: int | None = Field(None, ge=1, le=2**62, description="The version the alias moves to (promote).")
    alias: str = Field(CHAMPION, max_length=100, description="The alias: `champion`, or any other a team names.")


def registry(request: Request) -> Registry:
    return current(request).registry


REG = Depends(registry)
router = APIRouter(dependencies=[Depends(require)])


@router.get("/models")
def models(limit: int = Query(500, ge=1, le=500), offset: int = Query(0, ge=0, le=2**62), reg: Registry = REG) \
        -> dict:
    return {"models": reg.models(limit, offset), "total": reg.count(), "limit": limit, "offset": offset}


@router.get("/models/{model}")
def show(model: str, reg: Registry = REG) -> dict:
    return {"model": model, "versions": reg.versions(model), "aliases": reg.aliases(model),
            "events": reg.events(model)}


@router.post("/models/{model}/promote")
def promote(model: str, req: AliasRequest, reg: Registry = REG) -> dict:
    if req.version is None:
        return JSONResponse({"detail": "promote needs the version"}, status_code=422)
    return reg.promote(model, req.version, req.alias, f"v{req.version} made {req.alias} by hand")


@router.post("/models/{model}/rollback")
def rollback(model: str, req: AliasRequest | None = None, reg: Registry = REG) -> dict:
    return reg.rollback(model, req.alias if req else CHAMPION)


@router.get("/models/{model}/diff")
def diff(model: str, a: int = Query(..., ge=1, le=2**62), b: int = Query(..., ge=1, le=2**62),
         reg: Registry = REG) -> dict:
    return reg.diff(model, a, b)
