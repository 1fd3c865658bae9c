"""Issue 19 (6, 8): a settings error names the setting as the operator wrote it, where they
wrote it (``vram_limits.soft_gb`` in ``config.yaml``, a variable in the environment or on a
line of ``settings.env``, a command-line option), in one line of one form, without
pydantic's own wording."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import SettingsError, load_settings, load_settings_from

PYDANTIC_WORDS = ("Value error", "Input should", "http", "pydantic", "\n")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no settings.env unless a test writes one
    for k in list(os.environ):
        if k.startswith("VORTEX_"):
            monkeypatch.delenv(k)


def _error(**overrides) -> str:
    with pytest.raises(SettingsError) as err:
        load_settings(**overrides)
    text = str(err.value)
    assert text.startswith("invalid settings: "), text
    for word in PYDANTIC_WORDS:
        assert word not in text, text
    return text


def _yaml(monkeypatch, tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    monkeypatch.setenv("VORTEX_CONFIG_FILE", str(path))
    return path


# ------------------------------------------------------- 6. where the operator wrote it


def test_a_bad_yaml_value_names_the_yaml_key_and_the_file(monkeypatch, tmp_path):
    path = _yaml(monkeypatch, tmp_path, 'vram_limits:\n  soft_gb: "ten"\n')
    assert _error() == (f"invalid settings: {path}: vram_limits.soft_gb: must be a number "
                        "(got 'ten')")


def test_the_same_value_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VORTEX_SOFT_LIMIT_GB", "ten")
    assert _error() == "invalid settings: VORTEX_SOFT_LIMIT_GB: must be a number (got 'ten')"


def test_the_same_value_in_settings_env_names_the_file_line_and_variable(tmp_path):
    (tmp_path / "settings.env").write_text("# limits\nVORTEX_LEAK_WINDOW=50\n"
                                           "VORTEX_SOFT_LIMIT_GB=ten\n")
    assert _error() == ("invalid settings: settings.env:3: VORTEX_SOFT_LIMIT_GB: must be a "
                        "number (got 'ten')")


def test_the_environment_is_named_when_it_beats_the_files(monkeypatch, tmp_path):
    (tmp_path / "settings.env").write_text("VORTEX_SOFT_LIMIT_GB=10\n")
    _yaml(monkeypatch, tmp_path, "vram_limits: {soft_gb: 9}\n")
    monkeypatch.setenv("VORTEX_SOFT_LIMIT_GB", "-1")
    assert _error() == "invalid settings: VORTEX_SOFT_LIMIT_GB: must be above 0 (got -1.0)"


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("vram_limits: {emergency_cleanup: maybe}\n",
     "vram_limits.emergency_cleanup: must be true or false (got 'maybe')"),
    ("monitoring: {leak_detection_threshold_mb: -5}\n",
     "monitoring.leak_detection_threshold_mb: must be above 0 (got -5.0)"),
    ("monitoring: {snapshot_interval_s: [1]}\n",
     "monitoring.snapshot_interval_s: must be a number (got [1])"),
    ("vram_limits: {soft_gb: 12, hard_gb: 11}\n",
     "vram_limits.hard_gb: must be above vram_limits.soft_gb (12) (got 11.0)"),
    ("vram_limits: {soft_gb: ~}\n", "vram_limits.soft_gb: must be a number (got None)"),
])
def test_every_yaml_key_is_named_as_written(monkeypatch, tmp_path, yaml_text, expected):
    path = _yaml(monkeypatch, tmp_path, yaml_text)
    assert _error() == f"invalid settings: {path}: {expected}"


def test_a_rule_between_two_sources_names_each_as_written(monkeypatch, tmp_path):
    _yaml(monkeypatch, tmp_path, "vram_limits: {soft_gb: 12}\n")
    (tmp_path / "settings.env").write_text("VORTEX_HARD_LIMIT_GB=11\n")
    assert _error() == ("invalid settings: settings.env:1: VORTEX_HARD_LIMIT_GB: must be above "
                        "vram_limits.soft_gb (12) (got 11.0)")


def test_a_default_that_breaks_a_rule_says_it_is_the_default(monkeypatch):
    monkeypatch.setenv("VORTEX_SOFT_LIMIT_GB", "12")
    assert _error() == ("invalid settings: VORTEX_HARD_LIMIT_GB: must be above "
                        "VORTEX_SOFT_LIMIT_GB (12) (got 11.5, the default)")


def test_config_file_from_settings_env_is_read_and_named(tmp_path):
    (tmp_path / "c.yaml").write_text("vram_limits: {hard_gb: 11.2}\n")
    (tmp_path / "settings.env").write_text("VORTEX_CONFIG_FILE=c.yaml\n")
    assert load_settings().hard_limit_gb == 11.2
    (tmp_path / "settings.env").write_text("VORTEX_CONFIG_FILE=absent.yaml\n")
    assert _error().startswith("invalid settings: settings.env:1: "
                               "VORTEX_CONFIG_FILE=absent.yaml: cannot read it: ")


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("vram_limits: 3\n", "{path}: vram_limits: must be a mapping (got 3)"),
    ("- a\n", "VORTEX_CONFIG_FILE={path}: must hold a mapping at the top (got a list)"),
    ("vram_limits: {sofft_gb: 10}\n",
     "{path}: vram_limits.sofft_gb: unknown key (did you mean soft_gb?)"),
    ("monitoring: {zzz: 1}\n",
     "{path}: monitoring.zzz: unknown key (known: snapshot_interval_s, "
     "leak_detection_threshold_mb)"),
    ("vram_limits: [\n", "VORTEX_CONFIG_FILE={path}: not YAML: "),
])
def test_the_file_errors_have_the_same_form(monkeypatch, tmp_path, yaml_text, expected):
    path = _yaml(monkeypatch, tmp_path, yaml_text)
    assert _error().startswith("invalid settings: " + expected.format(path=path))


# ------------------------------------------------------------- 8. one form, own words


@pytest.mark.parametrize(("env", "expected"), [
    ({"VORTEX_PORT": "70000"}, "VORTEX_PORT: must be <= 65535 (got '70000')"),
    ({"VORTEX_LIMIT_BASIS": "free"},
     "VORTEX_LIMIT_BASIS: must be one of allocated, reserved (got 'free')"),
    ({"VORTEX_BACKEND": "gpu"}, "VORTEX_BACKEND: must be one of auto, cuda, simulated "
                                "(got 'gpu')"),
    ({"VORTEX_LEAK_WINDOW": "x"}, "VORTEX_LEAK_WINDOW: must be an integer (got 'x')"),
    ({"VORTEX_DEVICE": "-1"}, "VORTEX_DEVICE: must be >= 0 (got '-1')"),
    ({"VORTEX_TOKEN": "a b"}, "VORTEX_TOKEN: the token must be printable ASCII without spaces"),
    ({"VORTEX_TOKEN": "t", "VORTEX_TOKEN_FILE": "f"},
     "VORTEX_TOKEN_FILE: set only one of it and VORTEX_TOKEN (got 'f')"),
    ({"VORTEX_TOKEN_FILE": "absent"},
     "VORTEX_TOKEN_FILE: cannot read it: No such file or directory (got 'absent')"),
])
def test_environment_errors_have_one_form(monkeypatch, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _error() == "invalid settings: " + expected


def test_a_token_is_never_printed(monkeypatch):
    monkeypatch.setenv("VORTEX_TOKEN", "sekrit with space")
    assert "sekrit" not in _error()


def test_an_empty_token_file_is_named(monkeypatch, tmp_path):
    (tmp_path / "tok").write_text("\n")
    monkeypatch.setenv("VORTEX_TOKEN_FILE", "tok")
    assert _error() == "invalid settings: VORTEX_TOKEN_FILE: the file is empty (got 'tok')"


def test_several_problems_are_one_line(monkeypatch):
    monkeypatch.setenv("VORTEX_LEAK_WINDOW", "x")
    monkeypatch.setenv("VORTEX_PORT", "-3")
    assert _error() == ("invalid settings: VORTEX_LEAK_WINDOW: must be an integer (got 'x'); "
                        "VORTEX_PORT: must be >= 0 (got '-3')")


def test_overrides_are_named_by_their_keyword_or_the_name_given():
    assert _error(port=-3) == "invalid settings: port: must be >= 0 (got -3)"
    with pytest.raises(SettingsError) as err:
        load_settings_from({"port": 70000}, named={"port": "--port"})
    assert str(err.value) == "invalid settings: --port: must be <= 65535 (got 70000)"


def test_a_settings_env_that_is_not_utf8_has_the_same_form(tmp_path):
    (tmp_path / "settings.env").write_bytes(b"VORTEX_SOFT_LIMIT_GB=10\n# \xff\n")
    assert _error().startswith("invalid settings: settings.env: not UTF-8 text")


# ------------------------------------------------------------------ the demo's options


def _demo(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VORTEX_")}
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True,
                          timeout=60, env={**clean, **env},
                          cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize(("option", "value", "others"), [
    ("--shutdown-timeout", "-1", ("--work-ms",)),
    ("--shutdown-timeout", "0", ("--work-ms",)),
    ("--work-ms", "-1", ("--shutdown-timeout",)),
    ("--slot-seconds", "nan", ()),
    ("--leak-mb", "inf", ()),
    ("--pressure-every", "-1", ()),
    ("--generations", "-1", ()),
])
def test_a_demo_option_error_names_only_that_option(option, value, others):
    done = _demo(option, value)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"python -m app: error: {option} must be "), last
    for other in others:  # the usage line above lists every option
        assert other not in last


def test_a_demo_option_that_breaks_a_setting_is_named_as_the_option(tmp_path):
    done = _demo("--simulate", "--generations", "0", "--port", "70000")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: invalid settings: --port: must be <= 65535 "
                                   "(got 70000)")
    done = _demo("--simulate", "--generations", "0", "--token", "two words")
    assert done.stderr.strip() == ("error: invalid settings: --token: the token must be "
                                   "printable ASCII without spaces")
    done = _demo("--simulate", "--generations", "0", "--token-file", str(tmp_path / "nope"))
    assert done.stderr.strip().startswith("error: invalid settings: --token-file: cannot read "
                                          "it: No such file or directory")


def test_a_demo_setting_error_is_one_line_naming_the_yaml_key(tmp_path):
    (tmp_path / "config.yaml").write_text('vram_limits:\n  soft_gb: "ten"\n')
    done = _demo("--simulate", "--generations", "0",
                 VORTEX_CONFIG_FILE=str(tmp_path / "config.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: invalid settings: {tmp_path / 'config.yaml'}: "
                                   "vram_limits.soft_gb: must be a number (got 'ten')")
