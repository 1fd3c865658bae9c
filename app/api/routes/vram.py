from __future__ import annotations

import math

import orjson
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import MonitorDep, TokenDep, backend_unavailable, read_backend
from app.api.schemas import ErrorBody, Models, Scheduled
from app.errors import CleanupCooldownError
from app.monitor import CleanupResult, VRAMMonitor, VRAMSnapshot
from app.monitor.records import to_gb

router = APIRouter(prefix="/vram", tags=["vram"])
_UNAVAILABLE = {503: {"model": ErrorBody, "description": "The VRAM backend could not be read"}}


@router.get("/snapshot", response_model=VRAMSnapshot, responses=_UNAVAILABLE,
            summary="A fresh snapshot of the device and the monitor")
async def snapshot(request: Request) -> Response:
    monitor: VRAMMonitor = request.app.state.monitor
    # The snapshot is already a checked, immutable value: serialise it once, directly.
    snap = read_backend(lambda: monitor.snapshot("http_snapshot"))
    return Response(snap.to_json_bytes(), media_type="application/json")


@router.get("/models", response_model=Models, summary="Resident models and their budgets")
async def models(request: Request) -> Response:
    monitor: VRAMMonitor = request.app.state.monitor
    records = monitor.models()
    # Plain dicts from checked, immutable records, in the Models schema: the response model
    # documents it; building and validating pydantic objects per request cost more than the
    # rest of the request.
    body = {
        "device": monitor.device,
        "total_bytes": sum(r.vram_bytes for r in records),
        "models": [
            {"name": r.name, "vram_bytes": r.vram_bytes, "vram_gb": to_gb(r.vram_bytes),
             "budget_bytes": r.budget_bytes,
             "budget_gb": None if r.budget_bytes is None else to_gb(r.budget_bytes),
             "over_budget": r.over_budget, "source": r.source}
            for r in records
        ],
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.post(
    "/cleanup", response_model=CleanupResult, dependencies=[TokenDep],
    summary="Run an emergency cleanup (gc + empty_cache)",
    description="With no generation running it runs at once. While one runs, the generation "
    "thread carries it out at its next boundary (a guard call, a stage boundary or the slot's "
    "end); the answer waits up to VORTEX_CLEANUP_WAIT_S for it, else 202.",
    responses={
        202: {"model": Scheduled, "description": "Registered; the generation thread runs it at "
              "its next boundary"},
        401: {"model": ErrorBody, "description": "Missing or invalid bearer token",
              "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
        429: {"model": ErrorBody, "description": "Within the cleanup cooldown",
              "headers": {"Retry-After": {"description": "Seconds until a cleanup may run",
                                          "schema": {"type": "integer"}}}},
        **_UNAVAILABLE,
    },
)
async def cleanup(monitor: MonitorDep) -> Response:
    try:
        # Off the event loop: the cleanup runs here (milliseconds of gc and empty_cache), or
        # this waits up to cleanup_wait_s for the generation thread to carry it out.
        result = await run_in_threadpool(monitor.request_cleanup, "http")
    except CleanupCooldownError as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS, str(exc),
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        ) from None
    except Exception as exc:
        raise backend_unavailable(exc) from None
    if result is None:
        return JSONResponse(Scheduled().model_dump(), status_code=status.HTTP_202_ACCEPTED)
    return JSONResponse(result.to_dict())
