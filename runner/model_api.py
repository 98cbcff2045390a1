"""The runner server's model registry routes (`runner models ...` talks to them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from runner.registry import CHAMPION, Registry, UnknownModel


class AliasRequest(BaseModel):
    version: int | None = Field(None, description="The version the alias moves to (promote).")
    alias: str = Field(CHAMPION, description="The alias: `champion`, or any other a team names.")


def model_routes(app, registry: Registry, auth) -> None:
    router = APIRouter(dependencies=[Depends(auth)])

    @app.exception_handler(UnknownModel)
    async def _unknown(_, e: UnknownModel):
        return JSONResponse({"detail": str(e)}, status_code=404)

    @router.get("/models")
    def models() -> dict:
        return {"models": registry.models()}

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
    def diff(model: str, a: int = Query(...), b: int = Query(...)) -> dict:
        return registry.diff(model, a, b)

    app.include_router(router)
