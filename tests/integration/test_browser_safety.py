"""A control plane that browsers can't abuse: foreign Host names (DNS rebinding), cross-site
POSTs, and tokens that reach the server as configured. Real uvicorn on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from app import ControlPlaneError, load_settings, start_control_plane
from tests.integration.conftest import TOKEN
from tests.integration.helpers import running_demo

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _get(plane, path: str, host: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{plane.port}{path}", headers={"Host": host})


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "10.0.0.7:{port}",
                                  "localhost.evil.example", ""])
def test_a_foreign_host_is_refused_on_loopback(plane, host):
    r = _get(plane, "/vram/snapshot", host.format(port=plane.port))
    assert r.status_code == 421
    assert r.headers["content-type"].startswith("text/plain")
    assert "does not answer to Host" in r.text


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}",
                                  "[::1]:{port}", "[::1]", "LOCALHOST:{port}"])
def test_loopback_names_are_answered(plane, host):
    assert _get(plane, "/vram/snapshot", host.format(port=plane.port)).status_code == 200


def test_off_loopback_the_allowed_hosts_are_answered_and_no_other(node):
    monitor, _ = node
    with start_control_plane(monitor, host="0.0.0.0", port=0, token=TOKEN,
                             allowed_hosts="director.internal, 10.0.3.11") as cp:
        assert _get(cp, "/healthz", f"director.internal:{cp.port}").status_code == 200
        assert _get(cp, "/healthz", "10.0.3.11").status_code == 200
        assert _get(cp, "/healthz", f"evil.example:{cp.port}").status_code == 421
        # the CLI and the container's health check: never locked out by a named list
        assert _get(cp, "/healthz", f"127.0.0.1:{cp.port}").status_code == 200


def test_off_loopback_without_allowed_hosts_any_name_is_answered(node, caplog):
    monitor, _ = node
    with start_control_plane(monitor, host="0.0.0.0", port=0, token=TOKEN) as cp:
        assert _get(cp, "/healthz", "prometheus-sees-me-as-this").status_code == 200
    assert "VORTEX_ALLOWED_HOSTS" in caplog.text  # said so at start-up


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1",
                                    "https://127.0.0.1:{port}", "http://localhost:{port}"])
def test_a_cross_site_post_is_refused_and_changes_nothing(plane, node, origin):
    monitor, card = node
    card.free(card.allocate(100 << 20))
    r = httpx.post(f"{plane.url}/vram/cleanup",
                   headers={**AUTH, "Origin": origin.format(port=plane.port)})
    assert r.status_code == 403
    assert "cross-origin request refused" in r.text
    assert monitor.emergency_cleanups == 0


def test_same_origin_and_origin_less_posts_pass(plane, node):
    monitor, _ = node
    r = httpx.post(f"{plane.url}/vram/cleanup", headers={**AUTH, "Origin": plane.url})
    assert r.status_code == 200
    monitor_cleanups = monitor.emergency_cleanups
    r = httpx.post(f"{plane.url}/vram/cleanup", headers=AUTH)  # curl: no Origin
    assert r.status_code == 429  # past the Origin check, into the cooldown
    assert monitor.emergency_cleanups == monitor_cleanups == 1


def test_no_cors_headers_are_ever_sent(plane):
    r = httpx.get(f"{plane.url}/vram/snapshot", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    r = httpx.options(f"{plane.url}/vram/cleanup", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers


def test_the_settings_token_starts_the_control_plane(node, monkeypatch, tmp_path):
    monitor, _ = node
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VORTEX_TOKEN", TOKEN)
    settings = load_settings()
    assert isinstance(settings.token, SecretStr)
    with start_control_plane(monitor, port=0, token=settings.token) as cp:
        assert httpx.post(f"{cp.url}/vram/cleanup").status_code == 401
        assert httpx.post(f"{cp.url}/vram/cleanup", headers=AUTH).status_code == 200


@pytest.mark.parametrize("token", ["caf\u00e9-token", "two words", "", "tab\there"])
def test_a_token_no_header_could_carry_is_refused_at_start(node, token):
    monitor, _ = node
    with pytest.raises(ControlPlaneError, match="printable ASCII"):
        start_control_plane(monitor, port=0, token=token)


def test_a_token_file_keeps_the_token_out_of_ps(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # No pressure spikes: no soft-limit cleanup starts the clock the HTTP cleanup shares.
    with running_demo(tmp_path, "--token-file", str(token_file), "--slot-seconds", "0.05",
                      "--pressure-every", "0", "--log-level", "WARNING") as (proc, url):
        # What ps shows: the process's command line.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert str(token_file) in cmdline and not [a for a in cmdline if TOKEN in a]
        assert httpx.post(f"{url}/vram/cleanup").status_code == 401
        assert httpx.post(f"{url}/vram/cleanup", headers=AUTH).status_code in (200, 202)


def test_the_token_file_from_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running_demo(tmp_path, "--slot-seconds", "0.05", "--pressure-every", "0",
                      "--log-level", "WARNING", VORTEX_TOKEN_FILE=str(token_file)) as (_proc, url):
        assert httpx.post(f"{url}/vram/cleanup").status_code == 401
        assert httpx.post(f"{url}/vram/cleanup", headers=AUTH).status_code in (200, 202)


@pytest.mark.parametrize("setting", ["*", "*, director.internal", "director.internal"])
def test_on_loopback_no_setting_lets_a_foreign_host_in(node, setting):
    """Issue 17 (1): ``VORTEX_ALLOWED_HOSTS=*`` on 127.0.0.1 used to answer any Host, and a
    hostile Host and Origin reached the cleanup's cooldown; a named list locked the CLI out."""
    monitor, card = node
    card.free(card.allocate(100 << 20))
    with start_control_plane(monitor, host="127.0.0.1", port=0, token=TOKEN,
                             allowed_hosts=setting) as cp:
        assert _get(cp, "/vram/snapshot", f"evil.example:{cp.port}").status_code == 421
        r = httpx.post(f"{cp.url}/vram/cleanup", headers={
            **AUTH, "Host": "evil.example", "Origin": "http://evil.example"})
        assert r.status_code == 421
        assert _get(cp, "/healthz", f"127.0.0.1:{cp.port}").status_code == 200
        if setting == "director.internal":  # a list with * in it means any: ignored here
            assert _get(cp, "/healthz", "director.internal").status_code == 200
    assert monitor.emergency_cleanups == 0


def test_refused_requests_are_counted_and_logged_without_the_token(plane, caplog):
    """Issue 19 (3): 421, 403 and 401 left no trace, and the 421s were missing from
    http_requests_total."""
    import logging

    from app.api import security

    security._refusals.clear()
    with caplog.at_level(logging.WARNING, logger="app.api"):
        for _ in range(3):
            assert _get(plane, "/vram/snapshot", "evil.example").status_code == 421
        r = httpx.post(f"{plane.url}/vram/cleanup",
                       headers={**AUTH, "Origin": "http://evil.example"})
        assert r.status_code == 403
        r = httpx.post(f"{plane.url}/vram/cleanup",
                       headers={"Authorization": "Bearer wrong-secret-token"})
        assert r.status_code == 401
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 3  # one per reason: the repeated 421s are held back
    assert all("127.0.0.1" in line for line in lines)
    assert "wrong-secret-token" not in caplog.text and TOKEN not in caplog.text
    metrics = httpx.get(f"{plane.url}/metrics").text
    # the 421s, counted
    assert 'http_requests_total{handler="/vram/snapshot",method="GET",status="4xx"} 3.0' \
        in metrics
