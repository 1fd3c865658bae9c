"""Request limits enforced before routing."""

from __future__ import annotations

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
