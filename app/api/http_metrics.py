"""HTTP metrics of the control plane: requests and latency per route, for its own dashboards.

The same two series prometheus-fastapi-instrumentator's ``requests`` and ``latency`` metrics
give (``http_requests_total`` and ``http_request_duration_seconds``, labels ``handler``,
``method`` and ``status`` grouped as ``2xx``), at a fraction of the cost: that middleware
matched every request against the route table again and looked its label values up twice,
~180,000 instructions a request (measured with callgrind), more than the whole request of a
bare FastAPI endpoint. The control plane's routes are fixed paths, so the handler of a path
is looked up in a dict built once, and each label combination's children are kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: a control plane request takes about a millisecond; the tail is what matters.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UNMATCHED = "none"  # every unknown path is one series, so a scanner cannot blow the label set up


class HttpMetrics:
    """Pure ASGI middleware; ``excluded`` paths (``/metrics``) are not recorded."""

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry,
                 routes: Iterable[BaseRoute], excluded: Iterable[str] = ()) -> None:
        self.app = app
        self._handlers = {path: path for r in routes if (path := getattr(r, "path", None))}
        self._excluded = frozenset(excluded)
        self._requests = Counter("http_requests_total",
                                 "Total number of requests by method, status and handler.",
                                 ["handler", "method", "status"], registry=registry)
        self._latency = Histogram("http_request_duration_seconds",
                                  "Duration of HTTP requests in seconds",
                                  ["handler", "method", "status"], buckets=LATENCY_BUCKETS,
                                  registry=registry)
        self._children: dict[tuple[str, str, str], tuple] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan and websocket scopes have no path to count
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted in a Director's app: the route's own path
            path = path[len(root):]
        if path in self._excluded:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            key = (self._handlers.get(path, UNMATCHED), scope["method"],
                   f"{status // 100}xx")
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (self._requests.labels(*key),
                                                   self._latency.labels(*key))
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
