"""Request limits: header size, enforced before routing; the pace of costly reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

MAX_HEADER_BYTES = 8 * 1024  # nginx's default large_client_header_buffers size


class HeaderLimit:
    """Answer 431 to a request whose headers together exceed ``max_bytes``. h11 caps only
    what arrives incomplete, so a large header that lands in one read would pass."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if size > self.max_bytes:
                body = b'{"detail":"request headers too large"}'
                await send({"type": "http.response.start", "status": 431, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class MinInterval:
    """At most one call per ``interval_s``: ``take()`` gives 0.0 and starts a new interval, or
    the seconds left of the running one. A call that failed still counts: a backend that
    fails can be as slow to fail as to answer."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None

    def take(self) -> float:
        with self._lock:
            now = self._clock()
            if self._last is not None and (left := self._last + self.interval_s - now) > 0:
                return left
            self._last = now
            return 0.0
