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
    responses={503: {"model": Readiness, "description": "Not ready yet, or the generation "
                     "loop is stalled"}},
    summary="Readiness: pre-flight passed, models registered, no generation stalled",
    description="503 until pre-flight passed and models are registered, and while a "
    "generation has run longer than VORTEX_STALL_AFTER_S (a hung loop); it recovers by itself "
    "when the slot ends. A Director idle between slots is not stalled.",
)
async def readyz(monitor: MonitorDep) -> JSONResponse:
    n = len(monitor.models())
    live = monitor.liveness()
    detail = None
    if live.stalled:
        detail = (f"generation loop stalled: slot {live.slot} has run {live.running_s:.0f}s "
                  f"(stall_after_s={monitor.stall_after_s:g})")
    body = Readiness(ready=monitor.preflight_passed and n > 0 and not live.stalled,
                     preflight_passed=monitor.preflight_passed, models_registered=n,
                     stalled=live.stalled, running_slot=live.slot,
                     running_s=round(live.running_s, 3), detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
