"""The control plane's uvicorn server, in a daemon thread of the Director."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

from app.api.main import create_app
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)


class ControlPlaneError(RuntimeError):
    """The control plane could not start (port in use, bad address, no token off loopback)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve anywhere


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
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
    token: str | None = None,
    metrics_ttl_s: float = 1.0,
    startup_timeout: float = 10.0,
) -> ControlPlane:
    """Serve the control plane for ``monitor`` on ``host:port`` (0 picks a free port) and
    return once it accepts connections. Raises ``ControlPlaneError`` within seconds when
    it cannot: the port is taken, the address is bad, or the host is not loopback and no
    token is set. ``/metrics`` is rebuilt at most once per ``metrics_ttl_s``."""
    if not token and not is_loopback(host):
        raise ControlPlaneError(
            f"refusing to serve on non-loopback address {host!r} without a token "
            "(set VORTEX_TOKEN or --token)"
        )
    sock = _bind(host, port)
    config = uvicorn.Config(
        create_app(monitor, token=token, metrics_ttl_s=metrics_ttl_s),
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
    plane = ControlPlane(server, thread, sock, host)
    logger.info("VRAM control plane listening on %s", plane.url)
    return plane
