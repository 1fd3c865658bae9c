"""The shipped rules and dashboard against a real Prometheus scraping the real demo."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from tests.integration.helpers import ROOT, running_demo

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is absent: apt-get install -y prometheus"
)
RULES = ROOT / "docker/prometheus/alerts.yml"
DASHBOARD = ROOT / "docker/grafana/dashboards/vortex-vram.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(fn, what: str, timeout: float = 60.0, every: float = 0.5):
    """Call ``fn`` until it returns something truthy: Prometheus works on its own clock
    (1 s scrapes and rule evaluations), so its state is awaited, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def _panel_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    # Grafana substitutes these before the query reaches Prometheus.
    return [e.replace("$node", ".*").replace("$device", ".*").replace("$__rate_interval", "1m")
            for e in exprs]


@pytest.fixture
def stack(tmp_path):
    with running_demo(tmp_path, "--slot-seconds", "0.05", "--pressure-every", "0",
                      "--log-level", "WARNING",
                      VORTEX_SOFT_LIMIT_GB="10.0") as (_demo, url):
        target = url.removeprefix("http://")
        port = _free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: vortex-director\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
        )
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                yield client, url
        finally:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()


def _get(client: httpx.Client, path: str, **params) -> dict | None:
    try:
        r = client.get(path, params=params)
    except httpx.TransportError:
        return None  # not listening yet
    return r.json() if r.status_code == 200 else None


def test_prometheus_scrapes_alerts_and_serves_every_panel(stack):
    prom, demo_url = stack

    def target_up():
        body = _get(prom, "/api/v1/targets")
        targets = body["data"]["activeTargets"] if body else []
        return targets and targets[0]["health"] == "up"

    _poll(target_up, "the demo target to be up")

    def soft_alert():
        body = _get(prom, "/api/v1/alerts")
        alerts = body["data"]["alerts"] if body else []
        return [a for a in alerts if a["labels"]["alertname"] == "VortexVRAMSoftLimitExceeded"
                and a["state"] in ("pending", "firing")]

    (alert,) = _poll(soft_alert, "VortexVRAMSoftLimitExceeded to be pending or firing")
    assert alert["labels"]["severity"] == "ticket"
    assert alert["labels"]["device"] == "sim:0"

    with httpx.Client(base_url=demo_url) as demo:  # traffic for the HTTP latency panel
        for _ in range(20):
            assert demo.get("/vram/snapshot").status_code == 200

    nodes = _poll(lambda: (_get(prom, "/api/v1/label/instance/values",
                                **{"match[]": "icn_vortex_vram_usage_bytes"}) or {}).get("data"),
                  "the node variable's values")
    assert nodes == [demo_url.removeprefix("http://")]

    for expr in _panel_queries():
        def answered(expr=expr):
            body = _get(prom, "/api/v1/query", query=expr)
            assert body is None or body["status"] == "success", (expr, body)
            return body and body["data"]["result"]

        _poll(answered, f"data for panel query {expr!r}")
