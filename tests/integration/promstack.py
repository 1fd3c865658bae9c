"""Real Prometheus and Alertmanager processes, configured from this repository's own files.

The tests change only what a test must: listen addresses, the targets file, shorter scrape and
evaluation intervals, and receiver URLs. Rules, relabelling, routing and inhibition are the
shipped ones.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from tests.integration.helpers import ROOT

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMETHEUS_CONFIG = ROOT / "docker/prometheus/prometheus.yml"
RULES = ROOT / "docker/prometheus/alerts.yml"
ALERTMANAGER_CONFIG = ROOT / "docker/alertmanager/alertmanager.yml"
DIRECTOR_JOB = "vortex-director"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(fn: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.5) -> T:
    """Call ``fn`` until it returns something truthy. Prometheus and Alertmanager work on
    their own clocks (scrapes, rule evaluations, group waits), so their state is awaited
    with a deadline, never slept on."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def write_targets(path: Path, groups: list[dict[str, Any]]) -> Path:
    """A file_sd targets file: [{"targets": [...], "labels": {...}}, ...]."""
    path.write_text(yaml.safe_dump(groups))
    return path


def prometheus_config(
    out: Path, targets_file: Path, *, port: int, alertmanager_port: int | None = None,
    interval: str = "1s",
) -> Path:
    """The shipped prometheus.yml with the Directors read from ``targets_file``."""
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    cfg["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    cfg["rule_files"] = [str(RULES)]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    (sd,) = jobs[DIRECTOR_JOB]["file_sd_configs"]
    sd["files"] = [str(targets_file)]
    sd["refresh_interval"] = interval
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    if alertmanager_port is None:
        del cfg["alerting"]
        del jobs["alertmanager"]
    else:
        am = [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]
        cfg["alerting"]["alertmanagers"] = [{"static_configs": am}]
        jobs["alertmanager"]["static_configs"] = am
    cfg["scrape_configs"] = list(jobs.values())
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def alertmanager_config(out: Path, webhook_base: str) -> Path:
    """The shipped alertmanager.yml with every webhook receiver sent to
    ``webhook_base/<receiver name>``; route and inhibit rules untouched."""
    cfg = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in cfg["receivers"]:
        hooks = receiver.get("webhook_configs", [])
        assert hooks, f"receiver {receiver['name']} has no webhook to point at the test"
        for hook in hooks:
            hook["url"] = f"{webhook_base}/{receiver['name']}"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_prometheus(config: Path, port: int, workdir: Path) -> Iterator[httpx.Client]:
    assert PROMETHEUS is not None
    with _running_server("prometheus", [
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], port, workdir) as client:
        yield client


@contextmanager
def running_alertmanager(config: Path, port: int, workdir: Path) -> Iterator[httpx.Client]:
    assert ALERTMANAGER is not None
    with _running_server("alertmanager", [
        ALERTMANAGER, f"--config.file={config}", f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
        "--log.level=warn",
    ], port, workdir) as client:
        yield client


@contextmanager
def _running_server(name: str, argv: list[str], port: int,
                    workdir: Path) -> Iterator[httpx.Client]:
    """``argv`` started and ready (``/-/ready``), with a client on ``port``; its log in
    ``<workdir>/<name>.log`` is shown if it dies while starting."""
    log = workdir / f"{name}.log"
    with _process(argv, log) as proc, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        poll(lambda: proc.poll() is not None or api(client, "/-/ready", raw=True),
             f"{name} to be ready")
        assert proc.poll() is None, log.read_text()
        yield client


def api(client: httpx.Client, path: str, *, raw: bool = False, **params: str) -> Any:
    """The JSON answer (``raw``: True) of a 200, else None (not listening yet, or not ready)."""
    try:
        r = client.get(path, params=params)
    except httpx.TransportError:
        return None
    if r.status_code != 200:
        return None
    return True if raw else r.json()


def targets_up(client: httpx.Client, job: str = DIRECTOR_JOB) -> list[dict[str, Any]]:
    body = api(client, "/api/v1/targets")
    targets = body["data"]["activeTargets"] if body else []
    return [t for t in targets if t["labels"]["job"] == job and t["health"] == "up"]


def prometheus_alerts(client: httpx.Client) -> list[dict[str, Any]]:
    body = api(client, "/api/v1/alerts")
    return body["data"]["alerts"] if body else []


class Webhook:
    """An Alertmanager webhook receiver: records (path, payload) of every notification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[tuple[str, dict[str, Any]]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hook._lock:
                    hook._received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def notifications(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self._received)

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """(receiver path, alert) for every alert of every notification so far."""
        return [(path, alert) for path, payload in self.notifications()
                for alert in payload["alerts"]]

    def __enter__(self) -> Webhook:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
