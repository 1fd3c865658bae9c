"""What keeps browsers and foreign names out: the Host check, the Origin check, the token.

A control plane on loopback is reachable from every web page the operator's browser opens:
* **DNS rebinding**: a page on ``evil.example`` whose name then resolves to 127.0.0.1 can read
  ``/vram/snapshot`` as a same-origin request. Only the ``Host`` header tells it apart, so a
  request whose ``Host`` is not one of the names this server answers to is refused (421).
* **Cross-site requests**: a page can POST to ``http://127.0.0.1:8000/vram/cleanup`` without
  reading the answer (a "simple" request needs no CORS preflight). Browsers send ``Origin``
  on such a POST, so one whose ``Origin`` is not this server's own is refused (403). curl and
  Prometheus send no ``Origin`` and are unaffected. No CORS headers are ever sent.

Both are pure ASGI middleware: they answer before routing, parsing or metrics, and cost a
header lookup on every request.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("app.api")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve anywhere


def host_name(authority: str) -> str:
    """``Host`` header to a bare lower-case name: ``[::1]:8000`` -> ``::1``,
    ``LocalHost:80`` -> ``localhost``; ``""`` when it cannot be parsed."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return "" if end < 0 else authority[1:end]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def parse_allowed_hosts(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """A comma list (``VORTEX_ALLOWED_HOSTS``) or names to the names a Host check accepts;
    ``None`` (or ``*``) accepts any."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [host_name(n) if n.strip() != "*" else "*" for n in names if n.strip()]
    if not names or "*" in names:
        return None
    return tuple(dict.fromkeys(names))


def bearer_token(token: str | SecretStr | None) -> bytes | None:
    """The token as the bytes a header must carry; ``ValueError`` for a token that no HTTP
    header could ever match (headers arrive latin-1-decoded, and a bearer token is visible
    ASCII: RFC 6750's b64token is a subset of it)."""
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    if token is None:
        return None
    if not isinstance(token, str):
        raise ValueError(f"the token must be a str or SecretStr, got {type(token).__name__}")
    if not token or not all("!" <= c <= "~" for c in token):
        raise ValueError("the token must be non-empty printable ASCII without spaces "
                         "(characters ! to ~); no Authorization header could match it otherwise")
    return token.encode("ascii")


_refusal_lock = threading.Lock()
_refusals: dict[str, tuple[float, int]] = {}  # reason -> (monotonic of the last line, held)
REFUSAL_LOG_INTERVAL_S = 10.0


def log_refusal(scope: Scope, status: int, reason: str) -> None:
    """One WARNING per reason every ``REFUSAL_LOG_INTERVAL_S``, with how many were held back:
    the source address and the reason, never a header's value (the token stays out)."""
    now = time.monotonic()
    with _refusal_lock:
        last, held = _refusals.get(reason, (None, 0))
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_S:
            _refusals[reason] = (last, held + 1)
            return
        _refusals[reason] = (now, 0)
    client = scope.get("client") or ("?", 0)
    more = f" ({held} more since the last such line)" if held else ""
    logger.warning("control plane refused %s %s from %s: %d %s%s", scope.get("method", "?"),
                   scope.get("path", "?"), client[0], status, reason, more,
                   extra={"vram_event": "http_refused", "status": status, "reason": reason,
                          "source": client[0], "held_back": held})


async def _refuse(send: Send, status: int, text: str) -> None:
    body = text.encode("utf-8", "replace") + b"\n"
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class HostCheck:
    """Answer 421 to a request whose ``Host`` is not one of ``allowed`` (any port)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if host is None or host_name(host) not in self.allowed:
                log_refusal(scope, 421, "foreign Host (DNS rebinding?)")
                await _refuse(send, 421, f"misdirected request: this server does not answer "
                              f"to Host {host!r}")
                return
        await self.app(scope, receive, send)


class OriginCheck:
    """Answer 403 to a state-changing request whose ``Origin`` is not this server's own
    (scheme and ``Host``); requests without ``Origin`` pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _UNSAFE:
            origin = _header(scope, b"origin")
            if origin is not None and not self._same_origin(scope, origin):
                log_refusal(scope, 403, "cross-origin request")
                await _refuse(send, 403, f"cross-origin request refused: Origin {origin!r} "
                              "is not this control plane")
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _same_origin(scope: Scope, origin: str) -> bool:
        host = _header(scope, b"host")
        if host is None or origin == "null":
            return False
        parts = urlsplit(origin.strip().lower())
        return parts.scheme == scope.get("scheme", "http") and parts.netloc == host.lower() \
            and not parts.path.strip("/")
