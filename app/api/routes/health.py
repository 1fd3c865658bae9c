from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import MonitorDep
from app.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the server answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready yet"}},
    summary="Readiness: pre-flight passed and models are registered",
)
async def readyz(monitor: MonitorDep) -> JSONResponse:
    n = len(monitor.models())
    body = Readiness(ready=monitor.preflight_passed and n > 0,
                     preflight_passed=monitor.preflight_passed, models_registered=n)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
