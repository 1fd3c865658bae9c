"""The control plane's uvicorn server, in a daemon thread of the Director."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable

import uvicorn
from pydantic import SecretStr
from starlette.types import ASGIApp

from app.api.main import create_app
from app.api.security import LOOPBACK_HOSTS, bearer_token, is_loopback, parse_allowed_hosts
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)


class ControlPlaneError(RuntimeError):
    """The control plane could not start (port in use, bad address, no token off loopback)."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    # With proto 0, Nagle's algorithm held every response on a kept-alive connection until
    # the client's delayed ACK: ~40 ms a request for Prometheus, Grafana and live views.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Lets a restarted Director rebind past TIME_WAIT; Linux still refuses a second listener.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ControlPlaneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


class ControlPlane:
    """A running control plane. ``stop()`` shuts it down and joins its thread."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket,
                 host: str) -> None:
        self._server = server
        self._thread = thread
        self._sock = sock
        self.host = host
        self.port: int = sock.getsockname()[1]

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` the control plane answers on."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether its server thread is alive."""
        return self._thread.is_alive()

    def drain(self) -> None:
        """The Director begins to stop: /readyz answers 503 shutting_down from now on, and
        requests waiting on the generation thread answer at once."""
        stopping = getattr(getattr(self._server.config.app, "state", None), "stopping", None)
        if stopping is not None:
            stopping.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down and join its thread (at most ``timeout`` s, then connections
        that would not close are dropped)."""
        self.drain()  # requests waiting on the generation thread answer now
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Connections that would not close in time: drop them.
            self._server.force_exit = True
            self._thread.join(1.0)
        self._sock.close()
        if self._thread.is_alive():
            logger.warning("control plane thread did not stop within %.1fs", timeout)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_control_plane(
    monitor: VRAMMonitor,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | SecretStr | None = None,
    allowed_hosts: str | Iterable[str] | None = None,
    metrics_ttl_s: float = 1.0,
    startup_timeout: float = 10.0,
) -> ControlPlane:
    """Serve the control plane for ``monitor`` on ``host:port`` (0 picks a free port) and
    return once it accepts connections. Raises ``ControlPlaneError`` within seconds when
    it cannot: the port is taken, the address is bad, the host is not loopback and no token
    is set, or the token could never match a header. ``token`` is a ``str`` or the
    ``SecretStr`` that ``load_settings()`` returns.

    The Host check against DNS rebinding: on a loopback address the loopback names
    (``localhost``, ``127.0.0.1``, ``[::1]``) and the names ``allowed_hosts`` lists are
    answered, never any name (``*`` is ignored there, with a warning); off loopback, the
    loopback names (the CLI and health checks use them) and the names in
    ``allowed_hosts`` (``VORTEX_ALLOWED_HOSTS``), or any when it is unset, since a Director
    is scraped by names it cannot know (service discovery, load balancers, several
    interfaces). ``/metrics`` is rebuilt at most once per ``metrics_ttl_s``."""
    try:
        token_bytes = bearer_token(token)
    except ValueError as exc:
        raise ControlPlaneError(f"bad control plane token (VORTEX_TOKEN): {exc}") from None
    if token_bytes is None and not is_loopback(host):
        raise ControlPlaneError(
            f"refusing to serve on non-loopback address {host!r} without a token "
            "(set VORTEX_TOKEN_FILE, VORTEX_TOKEN or --token-file)"
        )
    if is_loopback(host):
        # The loopback names are always answered (the CLI and the health check use them);
        # names the operator lists are added; "any" never holds here: on loopback every web
        # page the operator opens could rebind its name to this server.
        named = parse_allowed_hosts(allowed_hosts)
        if allowed_hosts is not None and named is None:
            logger.warning("VORTEX_ALLOWED_HOSTS=* is ignored on loopback address %s: only "
                           "loopback names are answered there, against DNS rebinding", host)
        allowed_hosts = tuple(dict.fromkeys((*LOOPBACK_HOSTS, *(named or ()))))
    elif parse_allowed_hosts(allowed_hosts) is not None:
        # The CLI and the container's health check ask 127.0.0.1; a rebinding page never
        # sends a loopback Host (its own name is what it rebinds), so these are safe to add.
        allowed_hosts = (*LOOPBACK_HOSTS, *parse_allowed_hosts(allowed_hosts))
    else:
        logger.warning("control plane on %s answers any Host header: set VORTEX_ALLOWED_HOSTS "
                       "to the names it is reached by, against DNS rebinding", host)
    app = create_app(monitor, token=token, allowed_hosts=allowed_hosts,
                     metrics_ttl_s=metrics_ttl_s)
    plane = serve_in_thread(app, host=host, port=port, startup_timeout=startup_timeout)
    logger.info("VRAM control plane listening on %s", plane.url)
    return plane


def serve_in_thread(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout: float = 10.0) -> ControlPlane:
    """Serve any ASGI ``app`` the way the control plane is served (its socket, its uvicorn
    settings, a daemon thread); ``ControlPlaneError`` when it cannot start."""
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        log_config=None,  # the host's logging stays as it is
        access_log=False,
        lifespan="off",
        loop="asyncio",
        http="auto",  # httptools (C) when installed, else h11
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from uvicorn included
            failure.append(exc)

    thread = threading.Thread(target=serve, name="vortex-control-plane", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(1.0)
            sock.close()
            why = repr(failure[0]) if failure else "it did not start in time"
            raise ControlPlaneError(f"control plane failed to start on {host}:{port}: {why}")
        thread.join(0.01)  # wait on the thread, not a bare sleep: a death ends the wait
    return ControlPlane(server, thread, sock, host)
