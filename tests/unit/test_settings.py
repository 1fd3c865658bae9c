"""Configuration: defaults, settings.env, config.yaml, environment; bad values fail by name."""

from __future__ import annotations

import pytest

from app import SimulatedBackend, VRAMMonitor
from app.config import Settings, SettingsError, load_settings
from tests.conftest import GB


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no settings.env unless a test writes one
    import os

    for k in list(os.environ):
        if k.startswith("VORTEX_"):
            monkeypatch.delenv(k)


def test_defaults_are_the_cards():
    s = load_settings()
    assert (s.soft_limit_gb, s.hard_limit_gb, s.emergency_cleanup) == (11.0, 11.5, True)
    assert (s.limit_basis, s.leak_threshold_mb, s.leak_window) == ("allocated", 100.0, 100)
    assert (s.required_gb, s.host, s.port, s.token) == (11.8, "127.0.0.1", 8000, None)


def test_the_shipped_settings_env_matches_the_defaults(monkeypatch):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "settings.env"
    documented = {}
    for line in shipped.read_text().splitlines():
        line = line.strip().lstrip("#").strip()
        if line.startswith("VORTEX_") and "=" in line:
            key, _, value = line.partition("=")
            documented[key] = value
    fields = {f"VORTEX_{n.upper()}" for n in Settings.model_fields}
    assert set(documented) == fields  # every setting documented, nothing else
    for key, value in documented.items():
        if value:
            monkeypatch.setenv(key, value)
    assert load_settings() == Settings()


def test_environment_overrides_settings_env_and_yaml(monkeypatch, tmp_path):
    (tmp_path / "settings.env").write_text("VORTEX_SOFT_LIMIT_GB=10.5\nVORTEX_LEAK_WINDOW=50\n")
    (tmp_path / "config.yaml").write_text(
        "vram_limits: {soft_gb: 10.0, hard_gb: 11.2, emergency_cleanup: false}\n"
        "monitoring: {snapshot_interval_s: 5, leak_detection_threshold_mb: 64}\n"
        "pipeline: {other: stuff}\n"
    )
    monkeypatch.setenv("VORTEX_CONFIG_FILE", str(tmp_path / "config.yaml"))
    monkeypatch.setenv("VORTEX_LEAK_WINDOW", "20")
    s = load_settings()
    assert s.soft_limit_gb == 10.5  # settings.env beats config.yaml
    assert s.hard_limit_gb == 11.2 and s.emergency_cleanup is False  # from config.yaml
    assert s.snapshot_interval_s == 5 and s.leak_threshold_mb == 64
    assert s.leak_window == 20  # the environment beats settings.env
    m = VRAMMonitor.from_settings(s, backend=SimulatedBackend(12 * GB))
    assert m.soft_limit_bytes == 10_500_000_000 and m.leak_window == 20


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VORTEX_SOFT_LIMIT_GB": "-1"}, "VORTEX_SOFT_LIMIT_GB"),
        ({"VORTEX_SOFT_LIMIT_GB": "12", "VORTEX_HARD_LIMIT_GB": "11.5"}, "VORTEX_SOFT_LIMIT_GB"),
        ({"VORTEX_LIMIT_BASIS": "free"}, "VORTEX_LIMIT_BASIS"),
        ({"VORTEX_LEAK_WINDOW": "ten"}, "VORTEX_LEAK_WINDOW"),
        ({"VORTEX_CLEANUP_COOLDOWN_S": "-3"}, "VORTEX_CLEANUP_COOLDOWN_S"),
        ({"VORTEX_PORT": "70000"}, "VORTEX_PORT"),
        ({"VORTEX_EMERGENCY_CLEANUP": "maybe"}, "VORTEX_EMERGENCY_CLEANUP"),
    ],
)
def test_bad_values_fail_naming_the_setting(monkeypatch, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_yaml_with_a_typo_fails(monkeypatch, tmp_path):
    (tmp_path / "c.yaml").write_text("vram_limits: {sofft_gb: 10}\n")
    monkeypatch.setenv("VORTEX_CONFIG_FILE", str(tmp_path / "c.yaml"))
    with pytest.raises(SettingsError, match="sofft_gb"):
        load_settings()


def test_missing_yaml_fails_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("VORTEX_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    with pytest.raises(SettingsError, match="VORTEX_CONFIG_FILE"):
        load_settings()
