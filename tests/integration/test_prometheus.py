"""The shipped scrape config, rules and dashboard against a real Prometheus scraping the
real demo."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.integration.helpers import ROOT, running_demo
from tests.integration.promstack import (
    PROMETHEUS,
    api,
    free_port,
    poll,
    prometheus_alerts,
    prometheus_config,
    running_prometheus,
    targets_up,
    write_targets,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is absent: apt-get install -y prometheus"
)
DASHBOARD = ROOT / "docker/grafana/dashboards/vortex-vram.json"


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
        # No node label: the shipped relabelling must name the node after the address.
        targets = write_targets(tmp_path / "directors.yml", [{"targets": [target]}])
        port = free_port()
        config = prometheus_config(tmp_path / "prometheus.yml", targets, port=port)
        with running_prometheus(config, port, tmp_path) as prom:
            yield prom, url


def test_prometheus_scrapes_alerts_and_serves_every_panel(stack):
    prom, demo_url = stack
    address = demo_url.removeprefix("http://")
    poll(lambda: targets_up(prom), "the demo target to be up")

    def soft_alert():
        return [a for a in prometheus_alerts(prom)
                if a["labels"]["alertname"] == "VortexVRAMSoftLimitExceeded"
                and a["state"] in ("pending", "firing")]

    (alert,) = poll(soft_alert, "VortexVRAMSoftLimitExceeded to be pending or firing")
    assert alert["labels"]["severity"] == "ticket"
    assert alert["labels"]["device"] == "sim:0"
    assert alert["labels"]["node"] == address

    with httpx.Client(base_url=demo_url) as demo:  # traffic for the HTTP latency panel
        for _ in range(20):
            assert demo.get("/vram/snapshot").status_code == 200

    nodes = poll(lambda: (api(prom, "/api/v1/label/node/values",
                              **{"match[]": "icn_vortex_vram_usage_bytes"}) or {}).get("data"),
                 "the node variable's values")
    assert nodes == [address]

    # Every panel query must answer with data. All are polled together against one deadline,
    # so that a failure lists every query without data at once.
    pending = set(_panel_queries())
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for expr in sorted(pending):
            body = api(prom, "/api/v1/query", query=expr)
            assert body is None or body["status"] == "success", (expr, body)
            if body and body["data"]["result"]:
                pending.discard(expr)
        time.sleep(1)
    assert not pending, "panel queries without data:\n" + "\n".join(sorted(pending))
