from __future__ import annotations

import math
import pickle
import re
import time
from typing import Any, Literal

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import MonitorDep, TokenDep, backend_unavailable, read_backend
from app.api.schemas import ErrorBody, Models, Scheduled
from app.errors import CleanupCooldownError
from app.monitor import CleanupResult, VRAMMonitor, VRAMSnapshot
from app.monitor.records import to_gb

router = APIRouter(prefix="/vram", tags=["vram"])
_UNAVAILABLE = {503: {"model": ErrorBody, "description": "The VRAM backend could not be read"}}
_UNAUTHORIZED = {401: {"model": ErrorBody, "description": "Missing or invalid bearer token",
                       "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}}
MEMORY_SNAPSHOT_INTERVAL_S = 5.0  # it walks every block of the allocator: one per 5 s at most


@router.get("/snapshot", response_model=VRAMSnapshot, responses=_UNAVAILABLE,
            summary="A fresh snapshot of the device and the monitor")
async def snapshot(request: Request) -> Response:
    monitor: VRAMMonitor = request.app.state.monitor
    # The snapshot is already a checked, immutable value: serialise it once, directly.
    snap = read_backend(lambda: monitor.snapshot("http_snapshot"))
    return Response(snap.to_json_bytes(), media_type="application/json")


@router.get("/summary", response_class=PlainTextResponse,
            summary="PyTorch's memory_summary() table for the device",
            description="torch.cuda.memory_summary(device) on CUDA; on the simulated card the "
            "same table over its memory_stats(). The allocator's current, peak, allocated and "
            "freed figures per pool, in torch's binary units (KiB, MiB, GiB).",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "The table, as torch prints it"},
                       **_UNAVAILABLE})
async def summary(monitor: MonitorDep) -> PlainTextResponse:
    return PlainTextResponse(read_backend(monitor.memory_summary))


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
        **_UNAUTHORIZED,
        429: {"model": ErrorBody, "description": "Within the cleanup cooldown",
              "headers": {"Retry-After": {"description": "Seconds until a cleanup may run",
                                          "schema": {"type": "integer"}}}},
        **_UNAVAILABLE,
    },
)
async def cleanup(monitor: MonitorDep, request: Request) -> Response:
    try:
        # Off the event loop: the cleanup runs here (milliseconds of gc and empty_cache), or
        # this waits up to cleanup_wait_s for the generation thread to carry it out, or until
        # the control plane stops (then 202: it stays scheduled).
        result = await run_in_threadpool(monitor.request_cleanup, "http", None,
                                         request.app.state.stopping)
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


@router.get(
    "/memory_snapshot", dependencies=[TokenDep], response_class=Response,
    summary="The allocator's memory snapshot, for torch.cuda._memory_viz and memory_viz",
    description="PyTorch's own snapshot (torch.cuda.memory._snapshot()): every segment and "
    "block, with the Python frames that allocated them while memory history is recorded. "
    "As a pickle by default, which `python -m torch.cuda._memory_viz` and "
    "https://pytorch.org/memory_viz open; format=json for clients that must not unpickle "
    "data from the network. Costly: one per control plane every "
    f"{MEMORY_SNAPSHOT_INTERVAL_S:g} seconds, else 429.",
    responses={
        200: {"description": "The snapshot: a pickle, or JSON with format=json",
              "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                  "format": "binary"}},
                          "application/json": {"schema": {"type": "object"}}},
              "headers": {"Content-Disposition": {
                  "description": "attachment; filename=...pickle (the pickle only)",
                  "schema": {"type": "string"}}}},
        **_UNAUTHORIZED,
        429: {"model": ErrorBody, "description": "A snapshot was taken less than "
              f"{MEMORY_SNAPSHOT_INTERVAL_S:g} seconds ago",
              "headers": {"Retry-After": {"description": "Seconds until one may be taken",
                                          "schema": {"type": "integer"}}}},
        **_UNAVAILABLE,
    },
)
async def memory_snapshot(
    request: Request, monitor: MonitorDep,
    fmt: Literal["pickle", "json"] = Query("pickle", alias="format"),
) -> Response:
    left = request.app.state.memory_snapshots.take()
    if left > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"a memory snapshot is costly: one every {MEMORY_SNAPSHOT_INTERVAL_S:g}s; retry in "
            f"{left:.1f}s", headers={"Retry-After": str(max(1, math.ceil(left)))})
    # Off the event loop: it walks every block, and the encoding writes them all.
    try:
        snap = await run_in_threadpool(monitor.allocator_snapshot)
    except TypeError as exc:  # the backend keeps no snapshot to give
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"VRAM backend unavailable: {exc}") from None
    except Exception as exc:
        raise backend_unavailable(exc) from None
    try:
        body = await run_in_threadpool(_encode, snap, fmt)
    except Exception as exc:  # a backend's snapshot holding what neither format can write
        raise backend_unavailable(exc) from None
    if fmt == "json":
        return Response(body, media_type="application/json")
    name = f"vortex-{re.sub(r'[^A-Za-z0-9]+', '', monitor.device)}-" + time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime()) + ".pickle"
    return Response(body, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _encode(snap: dict[str, Any], fmt: str) -> bytes:
    if fmt == "json":
        # Tuples (segment_pool_id) become lists; anything else JSON lacks, its text.
        return orjson.dumps(snap, default=str, option=orjson.OPT_NON_STR_KEYS)
    return pickle.dumps(snap)
