from __future__ import annotations

import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

router = APIRouter(tags=["metrics"])


class PrometheusText(PlainTextResponse):
    # The classic text format: every Prometheus and promtool version reads it.
    media_type = CONTENT_TYPE_PLAIN_0_0_4


class ScrapeCache:
    """The exposition text, rebuilt at most once per ``ttl_s``.

    Building it costs ~0.5 ms of GIL time that the generation loop waits for; several
    scrapers (Prometheus HA pairs, dashboards hitting /metrics) within the TTL share one
    build. A TTL of 0 rebuilds on every scrape.
    """

    def __init__(self, registry: CollectorRegistry, ttl_s: float) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._body = b""
        self._built_at = float("-inf")

    def get(self) -> bytes:
        with self._lock:  # concurrent scrapes wait for one build rather than each building
            now = time.monotonic()
            if now - self._built_at >= self._ttl_s:
                self._body = generate_latest(self._registry)
                self._built_at = now
            return self._body


@router.get("/metrics", response_class=PrometheusText,
            summary="Prometheus metrics (text exposition format)")
async def metrics(request: Request) -> PrometheusText:
    # On the event loop: a build holds the GIL for ~0.5 ms wherever it runs, and a
    # threadpool hop would cost more than that on every cached scrape.
    return PrometheusText(request.app.state.scrape_cache.get())
