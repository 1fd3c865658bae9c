"""The control plane as the command line sees it: a few HTTP requests, answers as bytes + JSON.

Standard library only (``http.client``): the command makes one request a refresh on one
kept-alive connection, and needs nothing an HTTP library would add.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.cli.errors import CliError, ExitCode

# A Director told to listen on every interface is reached on loopback; the control plane
# answers only loopback names there (its DNS-rebinding check), so the URL names 127.0.0.1.
_LISTEN_ALL = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}


def default_url(env: Mapping[str, str] | None = None) -> str:
    """``http://HOST:PORT`` from ``VORTEX_HOST`` (127.0.0.1) and ``VORTEX_PORT`` (8000)."""
    env = os.environ if env is None else env
    host = env.get("VORTEX_HOST", "127.0.0.1").strip()
    host = _LISTEN_ALL.get(host, host).strip("[]")
    port = env.get("VORTEX_PORT", "8000").strip() or "8000"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def read_token(token_file: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: ``--token-file``, else ``VORTEX_TOKEN_FILE``, else ``VORTEX_TOKEN``."""
    env = os.environ if env is None else env
    path = token_file or env.get("VORTEX_TOKEN_FILE") or None
    if path is None:
        return _checked_token(env.get("VORTEX_TOKEN") or None, "VORTEX_TOKEN")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(ExitCode.USAGE, f"token file {path}: cannot read it: {exc}") from None
    if not token:
        raise CliError(ExitCode.USAGE, f"token file {path} is empty")
    return _checked_token(token, f"token file {path}")


def _checked_token(token: str | None, source: str) -> str | None:
    """A token an Authorization header can carry: printable ASCII without spaces, as the
    control plane requires of its own."""
    if token is not None and not all("!" <= c <= "~" for c in token):
        raise CliError(ExitCode.USAGE, f"{source}: the token must be printable ASCII without "
                       "spaces or line breaks")
    return token


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise CliError(ExitCode.ERROR, f"the answer (HTTP {self.status}) is not JSON: "
                           f"{self.body[:120]!r}") from None

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, as every answer of the control plane is."""
        body = self.json()
        if not isinstance(body, dict):
            raise CliError(ExitCode.ERROR, f"expected a JSON object, got {type(body).__name__}: "
                           f"{self.body[:120]!r}")
        return body

    @property
    def detail(self) -> str:
        """The server's ``{"detail": ...}`` message, or the start of a plain-text body."""
        try:
            body = json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace").strip()[:300]
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
        return json.dumps(body)[:300]


class ControlPlaneClient:
    """One connection to a Director's control plane, reopened when the server closed it."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 5.0) -> None:
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            hostname = parts.hostname
        except ValueError as exc:  # "http://[::1": an unclosed IPv6 bracket
            raise CliError(ExitCode.USAGE, f"bad URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise CliError(ExitCode.USAGE, f"bad URL {url!r}: expected http://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise CliError(ExitCode.USAGE, f"bad URL {url!r}: the port is not a number") from None
        host = _LISTEN_ALL.get(parts.hostname, parts.hostname)
        self._https = parts.scheme == "https"
        self._host, self._port = host, port
        self._prefix = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}" + (
            f":{port}" if port else "") + self._prefix
        self._token = token
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def get(self, path: str, *, accept: str = "application/json") -> Answer:
        return self._request("GET", path, {"Accept": accept, **self._auth()})

    def post(self, path: str) -> Answer:
        # A POST is not retried on a fresh connection: it may have run the first time.
        return self._request("POST", path, self._auth(), retry=False)

    def _auth(self) -> dict[str, str]:
        # Only the commands that need it read a token (cleanup, dump, frag).
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout)
        return self._conn

    def _request(self, method: str, path: str, headers: Mapping[str, str] | None = None,
                 *, retry: bool = True) -> Answer:
        headers = {"Accept": "application/json", **(headers or {})}
        for attempt in (1, 2):
            conn = self._connect()
            fresh = conn.sock is None
            try:
                conn.request(method, self._prefix + path, headers=headers)
                response = conn.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                # The server dropped a kept-alive connection between refreshes (its keep-alive
                # timeout is 5 s): one more try on a new connection, if this one was reused.
                if attempt == 1 and retry and not fresh:
                    continue
                raise self._unreachable(exc) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise self._unreachable(exc) from None
            if response.will_close:
                self.close()
            names = {k.lower(): v for k, v in response.getheaders()}
            return Answer(response.status, names, body)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _unreachable(self, exc: BaseException) -> CliError:
        if isinstance(exc, TimeoutError):
            why = f"no answer within {self._timeout:g}s"
        elif isinstance(exc, ConnectionRefusedError):
            why = "connection refused (is the Director running, on this port?)"
        elif isinstance(exc, socket.gaierror):
            why = f"cannot resolve {self._host!r}"
        else:
            why = str(exc) or type(exc).__name__
        return CliError(ExitCode.UNREACHABLE, f"cannot reach the control plane at {self.url}: "
                        f"{why}")
