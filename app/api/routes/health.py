from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import MonitorDep
from app.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the server answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: not started, stalled, "
                     "producing nothing, or shutting down (reason says which)"}},
    summary="Readiness: started, not stalled, producing, not shutting down",
    description="503 until pre-flight passed and models are registered (not_started); while "
    "a generation has run longer than VORTEX_STALL_AFTER_S (stalled: a hung loop); once "
    "VORTEX_NOT_PRODUCING_AFTER slots in a row were skipped or aborted, until one is produced "
    "(not_producing); and from the moment the Director begins to stop (shutting_down), so a "
    "balancer stops sending work. A Director idle between slots is ready.",
)
async def readyz(monitor: MonitorDep, request: Request) -> JSONResponse:
    state = monitor.readiness(shutting_down=request.app.state.stopping.is_set())
    live = monitor.liveness()
    body = Readiness(ready=state.ready, preflight_passed=monitor.preflight_passed,
                     models_registered=len(monitor.models()), stalled=live.stalled,
                     running_slot=live.slot, running_s=round(live.running_s, 3),
                     lost_slots_in_a_row=live.lost_in_a_row, reason=state.reason,
                     detail=state.detail)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
