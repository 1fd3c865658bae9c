"""The ops files agree with each other: every alert routes to the receiver its severity
promises, has a runbook entry and a promtool case that fires; recording rules are used;
compose gives each backend what it needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.integration.helpers import ROOT
from tests.integration.promstack import ALERTMANAGER_CONFIG, RULES

RUNBOOK = ROOT / "docs/runbook.md"
RULE_TESTS = ROOT / "docker/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "docker/grafana/dashboards/vortex-vram.json"
AMTOOL = shutil.which("amtool")
COMPOSE = shutil.which("docker-compose")
RECEIVER = {"page": "pager", "ticket": "tickets", "none": "watchdog"}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


ALERTS = [r for r in _rules() if "alert" in r]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


@pytest.mark.parametrize("rule", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_alert_has_severity_texts_and_runbook_entry(rule):
    assert rule["labels"]["severity"] in RECEIVER
    ann = rule["annotations"]
    assert ann["summary"] and ann["description"]
    page, _, anchor = ann["runbook"].partition("#")
    assert page == "docs/runbook.md"
    assert anchor == rule["alert"].lower()
    assert anchor in _anchors(RUNBOOK.read_text()), f"no runbook entry for {rule['alert']}"


def test_every_alert_fires_in_a_promtool_case():
    fired = {case["alertname"]
             for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert {a["alert"] for a in ALERTS} <= fired


def test_every_recording_rule_is_used_by_an_alert_or_a_panel():
    panels = DASHBOARD.read_text()
    alert_exprs = " ".join(a["expr"] for a in ALERTS)
    for rule in _rules():
        if "record" in rule:
            assert rule["record"] in alert_exprs or rule["record"] in panels, rule["record"]


def test_inhibit_rules_name_existing_alerts():
    names = {a["alert"] for a in ALERTS}
    cfg = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for rule in cfg["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            m = re.fullmatch(r'alertname!?="(\w+)"', matcher)
            if m:
                assert m.group(1) in names, matcher
        assert "instance" in rule["equal"]


needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool is absent: apt-get install prometheus-alertmanager")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is absent: apt-get install docker-compose")


@needs_amtool
@pytest.mark.parametrize("rule", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_alert_routes_to_its_severitys_receiver(rule):
    labels = [f"alertname={rule['alert']}", "instance=10.0.3.11:8000",
              *(f"{k}={v}" for k, v in rule["labels"].items())]
    out = subprocess.run(
        [AMTOOL, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == RECEIVER[rule["labels"]["severity"]]


def _compose(backend: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VORTEX_")}
    if backend is not None:
        env["VORTEX_BACKEND"] = backend
    out = subprocess.run([COMPOSE, "-f", str(ROOT / "compose.yaml"), "config"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@needs_compose
def test_compose_reserves_the_gpu_for_cuda_only():
    cuda, sim = _compose(None), _compose("simulated")
    gpu = cuda["services"]["director"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["capabilities"] == ["gpu"]
    assert cuda["services"]["director"]["environment"]["VORTEX_BACKEND"] == "cuda"
    assert "deploy" not in sim["services"]["director"]
    assert sim["services"]["director"]["environment"]["VORTEX_BACKEND"] == "simulated"
    # Prometheus reads the matching target file: production only on the GPU.
    for cfg, backend in ((cuda, "cuda"), (sim, "simulated")):
        mounts = " ".join(map(str, cfg["services"]["prometheus"]["volumes"]))
        assert f"docker/prometheus/targets/{backend}.yml" in mounts
    # Any other value is refused, not silently mapped to one of the two.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VORTEX_")}
    bad = subprocess.run([COMPOSE, "-f", str(ROOT / "compose.yaml"), "config", "-q"], cwd=ROOT,
                         env={**env, "VORTEX_BACKEND": "auto"}, capture_output=True, text=True)
    assert bad.returncode != 0


@needs_compose
def test_compose_keeps_secrets_out_of_the_environment():
    cfg = _compose("simulated")
    services = cfg["services"]
    for name, svc in services.items():
        env = set(svc.get("environment", {}))
        assert not env & {"VORTEX_TOKEN", "GF_SECURITY_ADMIN_PASSWORD"}, name
    assert services["director"]["environment"]["VORTEX_TOKEN_FILE"] == "/run/secrets/vortex_token"
    assert set(cfg["secrets"]) == {"vortex_token", "grafana_admin_password"}
    for name in ("prometheus", "alertmanager", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert any("/alertmanager" in str(v) for v in services["alertmanager"]["volumes"])
