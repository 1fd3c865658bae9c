"""Dependencies of the routes: the monitor, the token check, safe backend reads."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, status

from app.api.security import log_refusal
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def get_monitor(request: Request) -> VRAMMonitor:
    # async: FastAPI runs a plain-def dependency in its threadpool, a costly hop per request
    return request.app.state.monitor


MonitorDep = Annotated[VRAMMonitor, Depends(get_monitor)]


async def require_token(request: Request) -> None:
    """When a token is configured, demand ``Authorization: Bearer <token>``."""
    expected: bytes | None = request.app.state.token
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes: constant time in the token's content. Headers arrive
    # latin-1-decoded, so latin-1 gives back the bytes that were sent.
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode("latin-1"), expected
    ):
        log_refusal(request.scope, 401, "missing or invalid bearer token")
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


TokenDep = Depends(require_token)


def read_backend(fn: Callable[[], T]) -> T:
    """Run a monitor read; a failing backend is a 503 with a plain message, never a trace."""
    try:
        return fn()
    except Exception as exc:
        raise backend_unavailable(exc) from None


def backend_unavailable(exc: Exception) -> HTTPException:
    logger.warning("VRAM backend read failed: %s: %s", type(exc).__name__, exc)
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"VRAM backend unavailable: reading the device failed ({type(exc).__name__})",
    )
