"""Build the control plane's FastAPI app around a monitor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, ProcessCollector
from pydantic import SecretStr

from app._version import __version__
from app.api.http_metrics import HttpMetrics
from app.api.limits import HeaderLimit, MinInterval
from app.api.routes import health, metrics, vram
from app.api.security import HostCheck, OriginCheck, bearer_token, parse_allowed_hosts
from app.metrics import VRAMCollector
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)


def create_app(
    monitor: VRAMMonitor,
    *,
    token: str | SecretStr | None = None,
    allowed_hosts: str | Iterable[str] | None = None,
    metrics_ttl_s: float = 1.0,
) -> FastAPI:
    """The control plane for ``monitor``, ready to serve or to mount in a Director's own app.

    ``token`` guards ``POST /vram/cleanup`` and ``GET /vram/memory_snapshot`` (``ValueError``
    if no header could carry it).
    ``allowed_hosts`` (names or a comma list; ``None`` or ``*``: any) is the Host check that
    stops DNS rebinding: ``start_control_plane`` sets it from the address it binds, an app
    mounted elsewhere or driven by a test client sets it itself.
    """
    app = FastAPI(
        title="vortex-vram control plane",
        version=__version__,
        description="VRAM of the Director's device: snapshot, models, cleanup, the allocator's "
        "memory snapshot, metrics.",
        docs_url=None,  # the Swagger/ReDoc pages load assets from a CDN: left off
        redoc_url=None,
    )
    app.state.monitor = monitor
    # Set when the control plane stops: a request waiting on the generation thread (a cleanup)
    # answers at once instead of holding the shutdown up.
    app.state.stopping = threading.Event()
    app.state.token = bearer_token(token)
    # The app's own registry: two control planes in one process do not collide.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(VRAMCollector(monitor))
    ProcessCollector(registry=registry)  # start time, RSS, open FDs: the Director process
    app.state.registry = registry
    app.state.scrape_cache = metrics.ScrapeCache(registry, metrics_ttl_s)
    app.state.memory_snapshots = MinInterval(vram.MEMORY_SNAPSHOT_INTERVAL_S)
    routers = (health.router, vram.router, metrics.router)
    # Added last, run first: refusals cost no parsing and no routing; the metrics middleware
    # wraps them all, so a refused request (431, 421, 403) is counted like any other.
    app.add_middleware(OriginCheck)
    hosts = parse_allowed_hosts(allowed_hosts)
    if hosts is not None:
        app.add_middleware(HostCheck, allowed=hosts)
    app.add_middleware(HeaderLimit)
    app.add_middleware(HttpMetrics, registry=registry, excluded=("/metrics",),
                       routes=[route for r in routers for route in r.routes])

    for router in routers:
        app.include_router(router)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("control plane error on %s %s: %s: %s", request.method,
                     request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
