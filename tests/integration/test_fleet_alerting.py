"""Fleet alerting end to end: three demo Directors discovered through file_sd by a real
Prometheus running this repository's rules, a real Alertmanager running its routing tree, and
a webhook receiver. A Director over its soft limit gets a ticket naming it, a killed one gets
a page, and the healthy one gets nothing.

Timing comes from the shipped rules (VortexVRAMSoftLimitExceeded holds 2m,
VortexDirectorVRAMMonitorDown 1m) and the shipped route (group_wait 30s): about three minutes.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest

from tests.integration.helpers import running_demo
from tests.integration.promstack import (
    ALERTMANAGER,
    PROMETHEUS,
    Webhook,
    alertmanager_config,
    free_port,
    poll,
    prometheus_alerts,
    prometheus_config,
    running_alertmanager,
    running_prometheus,
    targets_up,
    write_targets,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None,
    reason="needs prometheus and prometheus-alertmanager: "
           "apt-get install -y prometheus prometheus-alertmanager",
)
# No pressure spikes: the only trouble on each node is the one the test makes.
QUIET = ("--slot-seconds", "0.05", "--pressure-every", "0", "--log-level", "WARNING")


def test_soft_limit_and_outage_reach_the_webhook_and_the_healthy_node_stays_quiet(tmp_path):
    with ExitStack() as stack:
        _, healthy = stack.enter_context(running_demo(tmp_path, *QUIET))
        # The simulated node idles at 10.8 GB allocated: a 10.0 GB soft limit is crossed at once.
        _, over = stack.enter_context(running_demo(tmp_path, *QUIET, VORTEX_SOFT_LIMIT_GB="10.0"))
        doomed_proc, doomed = stack.enter_context(running_demo(tmp_path, *QUIET))
        healthy, over, doomed = (u.removeprefix("http://") for u in (healthy, over, doomed))
        targets = write_targets(tmp_path / "directors.yml", [
            {"targets": [healthy], "labels": {"node": "healthy", "env": "test"}},
            {"targets": [over], "labels": {"node": "over-soft", "env": "test"}},
            {"targets": [doomed], "labels": {"node": "doomed", "env": "test"}},
        ])

        hook = stack.enter_context(Webhook())
        am_port, prom_port = free_port(), free_port()
        stack.enter_context(running_alertmanager(
            alertmanager_config(tmp_path / "alertmanager.yml", hook.url), am_port, tmp_path))
        prom = stack.enter_context(running_prometheus(
            prometheus_config(tmp_path / "prometheus.yml", targets, port=prom_port,
                              alertmanager_port=am_port),
            prom_port, tmp_path))

        poll(lambda: len(targets_up(prom)) == 3, "all three Directors to be scraped")
        doomed_proc.kill()
        doomed_proc.wait(10)
        killed_at = time.monotonic()

        def delivered(alertname: str, instance: str) -> list[tuple[str, dict]]:
            return [(path, a) for path, a in hook.alerts()
                    if a["labels"]["alertname"] == alertname
                    and a["labels"].get("instance") == instance and a["status"] == "firing"]

        soft = poll(lambda: delivered("VortexVRAMSoftLimitExceeded", over),
                    "the soft-limit ticket of the node over it to reach the webhook", timeout=240)
        down = poll(lambda: delivered("VortexDirectorVRAMMonitorDown", doomed),
                    "the page for the killed node to reach the webhook", timeout=120)
        # Not before its for: 1m had elapsed after the kill.
        assert time.monotonic() - killed_at >= 60

        path, alert = soft[0]
        assert path == "/tickets"                      # severity=ticket route
        assert alert["labels"]["node"] == "over-soft"
        assert alert["labels"]["severity"] == "ticket"
        assert "above the soft limit of 10GB" in alert["annotations"]["description"]
        path, alert = down[0]
        assert path == "/pager"                        # severity=page route
        assert alert["labels"]["node"] == "doomed"

        # The healthy node: nothing delivered, and nothing even pending in Prometheus.
        assert not [a for _, a in hook.alerts() if a["labels"].get("instance") == healthy]
        assert not [a for a in prometheus_alerts(prom) if a["labels"].get("instance") == healthy]
        # The heartbeat took its own route.
        assert any(path == "/watchdog" for path, _ in hook.alerts())
