"""Build the control plane's FastAPI app around a monitor."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator

from app.api.limits import HeaderLimit
from app.api.routes import health, metrics, vram
from app.metrics import VRAMCollector
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)


def create_app(
    monitor: VRAMMonitor, *, token: str | None = None, metrics_ttl_s: float = 1.0
) -> FastAPI:
    app = FastAPI(
        title="vortex-vram control plane",
        version="0.1.0",
        description="VRAM of the Director's device: snapshot, models, cleanup, metrics.",
        docs_url=None,  # the Swagger/ReDoc pages load assets from a CDN: left off
        redoc_url=None,
    )
    app.state.monitor = monitor
    app.state.token = token.encode() if token else None
    # The app's own registry: two control planes in one process do not collide.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(VRAMCollector(monitor))
    app.state.registry = registry
    app.state.scrape_cache = metrics.ScrapeCache(registry, metrics_ttl_s)
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app)
    app.add_middleware(HeaderLimit)  # added last: runs first, before any parsing or metrics

    app.include_router(health.router)
    app.include_router(vram.router)
    app.include_router(metrics.router)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("control plane error on %s %s: %s: %s", request.method,
                     request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
