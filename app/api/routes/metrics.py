from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

router = APIRouter(tags=["metrics"])


class PrometheusText(PlainTextResponse):
    # The classic text format: every Prometheus and promtool version reads it.
    media_type = CONTENT_TYPE_PLAIN_0_0_4


@router.get("/metrics", response_class=PrometheusText,
            summary="Prometheus metrics (text exposition format)")
def metrics(request: Request) -> PrometheusText:
    # A plain def: the scrape reads the backend and formats text, off the event loop.
    return PrometheusText(generate_latest(request.app.state.registry))
