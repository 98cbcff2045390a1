"""The runner server's model registry routes (`runner models ...` talks to them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from runner.registry import CHAMPION, Registry, UnknownModel


class AliasRequest(BaseModel):
    version: int | None = Field(None, ge=1, le=2**62, description="The version the alias moves to (promote).")
    alias: str = Field(CHAMPION, max_length=100, description="The alias: `champion`, or any other a team names.")


def model_routes(app, registry: Registry, auth) -> None:
    router = APIRouter(dependencies=[Depends(auth)])

    @app.exception_handler(UnknownModel)
    async def _unknown(_, e: UnknownModel):
        return JSONResponse({"detail": str(e)}, status_code=404)

    @router.get("/models")
    def models(limit: int = Query(500, ge=1, le=500), offset: int = Query(0, ge=0, le=2**62)) -> dict:
        return {"models": registry.models(limit, offset), "total": registry.count(), "limit": limit,
                "offset": offset}

    @router.get("/models/{model}")
    def show(model: str) -> dict:
        return {"model": model, "versions": registry.versions(model), "aliases": registry.aliases(model),
                "events": registry.events(model)}

    @router.post("/models/{model}/promote")
    def promote(model: str, req: AliasRequest) -> dict:
        if req.version is None:
            return JSONResponse({"detail": "promote needs the version"}, status_code=422)
        return registry.promote(model, req.version, req.alias, f"v{req.version} made {req.alias} by hand")

    @router.post("/models/{model}/rollback")
    def rollback(model: str, req: AliasRequest | None = None) -> dict:
        return registry.rollback(model, req.alias if req else CHAMPION)

    @router.get("/models/{model}/diff")
    def diff(model: str, a: int = Query(..., ge=1, le=2**62), b: int = Query(..., ge=1, le=2**62)) -> dict:
        return registry.diff(model, a, b)

    app.include_router(router)
