"""Configuration: defaults, settings.env, config.yaml, environment; bad values fail by name."""

from __future__ import annotations

from typing import ClassVar

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


# ---------------------------------------------------------------- the backend from settings


@pytest.mark.parametrize(
    ("env", "named"),
    [({"VORTEX_BACKEND": "gpu"}, "VORTEX_BACKEND"), ({"VORTEX_DEVICE": "-1"}, "VORTEX_DEVICE"),
     ({"VORTEX_DEVICE": "first"}, "VORTEX_DEVICE"),
     ({"VORTEX_STALL_AFTER_S": "0"}, "VORTEX_STALL_AFTER_S"),
     ({"VORTEX_PYTHON_WARNINGS": "sometimes"}, "VORTEX_PYTHON_WARNINGS")],
)
def test_bad_backend_settings_name_the_variable(monkeypatch, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=named):
        load_settings()


class _RecordingCuda:
    """Stands in for CudaBackend: records how the factory built it."""

    calls: ClassVar[list[tuple[int, dict]]] = []

    def __init__(self, device: int = 0, **kwargs) -> None:
        _RecordingCuda.calls.append((device, kwargs))
        self._sim = SimulatedBackend(12 * GB, device=f"cuda:{device}")

    def __getattr__(self, name):
        return getattr(self._sim, name)


@pytest.fixture
def recording_cuda(monkeypatch):
    import app.backends.factory as factory

    _RecordingCuda.calls = []
    monkeypatch.setattr(factory, "CudaBackend", _RecordingCuda)
    return _RecordingCuda.calls


def test_every_way_to_a_monitor_honours_backend_device_and_history(monkeypatch, tmp_path,
                                                                    recording_cuda):
    """VRAMMonitor.from_settings, the lazy process-wide monitor behind the guards and
    default_backend() all watch the device the settings name: a Director on cuda:1 is
    never silently watching cuda:0."""
    import app
    from app.backends import default_backend

    monkeypatch.setenv("VORTEX_BACKEND", "cuda")
    monkeypatch.setenv("VORTEX_DEVICE", "1")
    monkeypatch.setenv("VORTEX_MEMORY_HISTORY", "true")
    monkeypatch.setenv("VORTEX_MEMORY_HISTORY_DIR", str(tmp_path / "dumps"))
    monkeypatch.setenv("VORTEX_MEMORY_HISTORY_MAX_DUMPS", "3")
    expected = (1, {"memory_history": True, "history_dir": tmp_path / "dumps", "max_dumps": 3})

    assert VRAMMonitor.from_settings(load_settings()).device == "cuda:1"
    assert app.get_monitor().device == "cuda:1"  # the guards' monitor
    assert default_backend().device == "cuda:1"
    assert recording_cuda == [expected] * 3


def test_the_simulated_backend_from_settings(monkeypatch):
    monkeypatch.setenv("VORTEX_BACKEND", "simulated")
    monkeypatch.setenv("VORTEX_DEVICE", "2")
    monitor = VRAMMonitor.from_settings(load_settings())
    assert isinstance(monitor.backend, SimulatedBackend) and monitor.device == "sim:2"
    assert monitor.backend.device_memory().total_bytes == 12 * 2**30  # the demo's RTX 3060


def test_an_unknown_variable_is_named_with_the_closest_setting(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VORTEX_SOFTLIMIT_GB", "10")
    (tmp_path / "settings.env").write_text("VORTEX_HARD_LIMT_GB=11\nVORTEX_ZZZ=1\n")
    s = load_settings()
    assert s.soft_limit_gb == 11.0  # ignored, as before, but no longer silently
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "unknown setting VORTEX_SOFTLIMIT_GB is ignored (did you mean " \
           "VORTEX_SOFT_LIMIT_GB?)" in warned
    assert "unknown setting VORTEX_HARD_LIMT_GB is ignored (did you mean " \
           "VORTEX_HARD_LIMIT_GB?)" in warned
    assert "unknown setting VORTEX_ZZZ is ignored" in warned


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"soft_limit_gb": "abc"}, "soft_limit_gb"), ({"hard_limit_gb": None}, "hard_limit_gb"),
     ({"leak_threshold_mb": float("nan")}, "leak_threshold_mb"),
     ({"cleanup_cooldown_s": "30"}, "cleanup_cooldown_s"), ({"leak_window": 2.5}, "leak_window"),
     ({"stall_after_s": True}, "stall_after_s")],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VRAMMonitor(backend=SimulatedBackend(12 * GB), **kwargs)


# ------------------------------------------- issue 19 (7): the YAML keys are documented


def _shipped(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / name


def test_the_example_config_yaml_loads_and_covers_every_key_the_loader_reads(monkeypatch):
    """config.example.yaml holds every key of every section the YAML source reads, each
    after a comment naming its variable and default, at the default: it cannot drift."""
    from app.config import _YAML_KEYS, env_name

    example = _shipped("config.example.yaml")
    monkeypatch.setenv("VORTEX_CONFIG_FILE", str(example))
    assert load_settings() == Settings()  # it loads, at the defaults

    import yaml

    doc = yaml.safe_load(example.read_text())
    assert {s: set(body) for s, body in doc.items()} == {
        s: set(keys) for s, keys in _YAML_KEYS.items()}
    lines = example.read_text().splitlines()
    for keys in _YAML_KEYS.values():
        for key, setting in keys.items():
            at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
            comment = []
            for line in reversed(lines[:at]):
                if not line.strip().startswith("#"):
                    break
                comment.append(line)
            text = " ".join(comment)
            assert env_name(setting) in text and "Default" in text, key


def test_the_readme_and_settings_env_name_each_yaml_key():
    from app.config import _YAML_KEYS

    readme = _shipped("README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    settings_env = _shipped("settings.env").read_text()
    assert "config.example.yaml" in section and "config.example.yaml" in settings_env
    for name, keys in _YAML_KEYS.items():
        for key in keys:
            assert f"{name}.{key}" in section, key
            assert f"{name}.{key}" in settings_env, key
