"""Settings: defaults < config.yaml (the task card's Director shape) < settings.env < environment.

Every setting is ``VORTEX_<NAME>`` in the environment and in ``settings.env``; ``config.yaml``
holds a few of them under the keys of ``_YAML_KEYS`` (``config.example.yaml`` shows each). A
bad value fails start-up with one line, ``invalid settings: <name>: <reason> (got <value>)``,
where the name is what the operator wrote, where they wrote it: ``VORTEX_SOFT_LIMIT_GB``
(environment), ``settings.env:3: VORTEX_SOFT_LIMIT_GB``, ``config.yaml: vram_limits.soft_gb``,
or a front end's own name for an override (the demo's ``--port``).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.options import OptionError, check_options

ENV_PREFIX = "VORTEX_"
ENV_FILE = "settings.env"
logger = logging.getLogger(__name__)

# config.yaml section -> {key: setting}
_YAML_KEYS = {
    "vram_limits": {
        "soft_gb": "soft_limit_gb",
        "hard_gb": "hard_limit_gb",
        "emergency_cleanup": "emergency_cleanup",
    },
    "monitoring": {
        "snapshot_interval_s": "snapshot_interval_s",
        "leak_detection_threshold_mb": "leak_threshold_mb",
    },
}


class SettingsError(ValueError):
    """A setting is invalid. The message is one line, ``invalid settings: <name>: <reason>``,
    naming the setting as the operator wrote it: the variable, the ``settings.env`` line or
    the ``config.yaml`` key (with the file)."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _invalid(*problems: str) -> SettingsError:
    return SettingsError("invalid settings: " + "; ".join(problems))


def _env_file_lines() -> dict[str, int]:
    """``settings.env``'s variables (lower case) -> the line that sets them (the last one)."""
    lines: dict[str, int] = {}
    if Path(ENV_FILE).is_file():
        text = Path(ENV_FILE).read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            match = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
            if match:
                lines[match.group(1).lower()] = number
    return lines


def _env_file_name(variable: str, lines: Mapping[str, int]) -> str:
    """``settings.env:<line>: <variable>``, as an error line names a setting from there."""
    line = lines.get(variable.lower())
    return f"{ENV_FILE}:{line}: {variable}" if line else f"{ENV_FILE}: {variable}"


def _config_file(init_kwargs: Mapping[str, Any]) -> tuple[str | None, str]:
    """The config.yaml path, by the settings' own precedence, and the name that set it."""
    if init_kwargs.get("config_file"):
        return str(init_kwargs["config_file"]), "config_file"
    name = env_name("config_file")
    value = next((v for k, v in os.environ.items() if k.upper() == name), None)
    if value:
        return value, name
    if Path(ENV_FILE).is_file():
        value = next((v for k, v in dotenv_values(ENV_FILE).items() if k.upper() == name), None)
        if value:
            return value, _env_file_name(name, _env_file_lines())
    return None, name


def _read_yaml(path: str, named: str) -> dict[str, tuple[Any, str]]:
    """The settings ``config.yaml`` at ``path`` holds: setting -> (value, ``section.key``)."""
    where = f"{named}={path}"
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise _invalid(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise _invalid(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise _invalid(f"{where}: not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict):
        raise _invalid(f"{where}: must hold a mapping at the top (got a "
                       f"{'list' if isinstance(doc, list) else type(doc).__name__})")
    values: dict[str, tuple[Any, str]] = {}
    for section, keys in _YAML_KEYS.items():
        body = doc.get(section) or {}
        if not isinstance(body, dict):
            raise _invalid(f"{path}: {section}: must be a mapping (got {body!r})")
        for key, value in body.items():
            if key not in keys:
                close = difflib.get_close_matches(str(key), list(keys), n=1)
                hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(keys)}"
                raise _invalid(f"{path}: {section}.{key}: unknown key ({hint})")
            values[keys[key]] = (value, f"{section}.{key}")
    return values


class _DirectorYamlSource(PydanticBaseSettingsSource):
    """Reads the task card's ``config.yaml`` (``vram_limits``/``monitoring`` sections) from
    ``VORTEX_CONFIG_FILE``; other sections of a Director config are left alone."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None, named: str) -> None:
        super().__init__(settings_cls)
        self._path, self._named = path, named

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the mapping whole

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        return {k: v for k, (v, _) in _read_yaml(self._path, self._named).items()}


_SECRET = object()  # an OptionError's value that no message shows


class Settings(BaseSettings):
    """The Director's settings: ``VORTEX_*`` variables, ``settings.env`` and the task card's
    ``config.yaml`` (``VORTEX_CONFIG_FILE``). ``load_settings()`` builds one with errors as
    one line naming each setting as it was written; ``monitor_kwargs()`` gives
    ``VRAMMonitor``'s arguments."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=ENV_FILE, extra="ignore", validate_default=True
    )

    backend: Literal["auto", "cuda", "simulated"] = Field(
        "auto", description="auto: the GPU if torch sees one, else a simulated 12 GB RTX 3060.")
    device: int = Field(0, ge=0, description="CUDA device index (as torch numbers them).")

    soft_limit_gb: float = Field(11.0, description="Warn (and clean the cache) above this.")
    hard_limit_gb: float = Field(11.5, description="Refuse allocations past this.")
    emergency_cleanup: bool = Field(True, description="Clean the allocator cache on pressure.")
    limit_basis: Literal["allocated", "reserved"] = "allocated"
    leak_threshold_mb: float = 100.0
    leak_window: int = 100
    cleanup_cooldown_s: float = 30.0
    cleanup_wait_s: float = 10.0
    soft_limit_hysteresis_mb: float = 100.0
    required_gb: float = 11.8
    snapshot_interval_s: float = 60.0
    stall_after_s: float = 300.0
    python_warnings: bool = Field(True, description="Also issue Python warnings, not just logs.")
    admission_window: int = Field(100, description="Slots the admission forecast uses.")
    admission_quantile: float = 0.9
    admission_margin: float = 0.05
    not_producing_after: int = Field(20, description="Slots lost in a row (skipped or "
                                     "aborted) after which /readyz says not_producing.")
    memory_history: bool = Field(False, description="Record allocator history for OOM dumps.")
    memory_history_dir: Path = Path("vram-postmortem")
    memory_history_max_dumps: int = Field(5, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    allowed_hosts: str | None = Field(
        None, description="Comma list of the Host names the control plane answers off "
        "loopback; unset: any. On loopback only loopback names are answered.")
    token: SecretStr | None = None
    token_file: Path | None = Field(None, description="A file holding the bearer token.")
    config_file: Path | None = None

    @model_validator(mode="after")
    def _token(self) -> Settings:
        """One token, from ``VORTEX_TOKEN_FILE`` (not visible in ``ps`` or ``docker inspect``)
        or ``VORTEX_TOKEN``, and one that an HTTP header can carry. Errors never show it."""
        if self.token_file is not None:
            if self.token is not None:
                raise OptionError("token_file", str(self.token_file),
                                  "set only one of it and {0}", ("token",))
            try:
                text = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise OptionError("token_file", str(self.token_file),
                                  f"cannot read it: {exc.strerror or exc}") from None
            except UnicodeDecodeError:
                raise OptionError("token_file", str(self.token_file),
                                  "not UTF-8 text") from None
            if not text:
                raise OptionError("token_file", str(self.token_file), "the file is empty")
            self.token = SecretStr(text)
        if self.token is not None:
            value = self.token.get_secret_value()
            if not value or not all("!" <= c <= "~" for c in value):
                raise OptionError("token_file" if self.token_file else "token", _SECRET,
                                  "the token must be printable ASCII without spaces")
        return self

    @model_validator(mode="after")
    def _monitor_options(self) -> Settings:
        """The monitor's own rules (app/monitor/options.py), so they are written once; the
        error names the option, and ``load_settings`` the variable."""
        check_options(**self.monitor_kwargs())
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path, named = _config_file(getattr(init_settings, "init_kwargs", {}))
        return (
            init_settings, env_settings, dotenv_settings,
            _DirectorYamlSource(settings_cls, path, named),
        )

    def monitor_kwargs(self) -> dict[str, Any]:
        """The ``VRAMMonitor`` constructor's arguments."""
        return {
            "soft_limit_gb": self.soft_limit_gb,
            "hard_limit_gb": self.hard_limit_gb,
            "emergency_cleanup": self.emergency_cleanup,
            "limit_basis": self.limit_basis,
            "leak_threshold_mb": self.leak_threshold_mb,
            "leak_window": self.leak_window,
            "cleanup_cooldown_s": self.cleanup_cooldown_s,
            "cleanup_wait_s": self.cleanup_wait_s,
            "soft_limit_hysteresis_mb": self.soft_limit_hysteresis_mb,
            "snapshot_interval_s": self.snapshot_interval_s,
            "stall_after_s": self.stall_after_s,
            "required_gb": self.required_gb,
            "python_warnings": self.python_warnings,
            "admission_window": self.admission_window,
            "admission_quantile": self.admission_quantile,
            "admission_margin": self.admission_margin,
            "not_producing_after": self.not_producing_after,
        }


def unknown_variables(env: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """``VORTEX_*`` names in the environment and ``settings.env`` that are no setting, each
    with the closest known one (None when nothing is close): a typo such as
    ``VORTEX_SOFTLIMIT_GB`` is otherwise silently ignored."""
    names = set(os.environ if env is None else env)
    if env is None and Path(ENV_FILE).is_file():
        names |= set(dotenv_values(ENV_FILE))
    known = [f.upper() for f in Settings.model_fields]

    def closest(suffix: str) -> str | None:
        # Compared without the shared prefix, which would make every name look alike.
        match = difflib.get_close_matches(suffix, known, n=1, cutoff=0.6)
        return ENV_PREFIX + match[0] if match else None

    return {
        name: closest(name[len(ENV_PREFIX):])
        for name in sorted(names)
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):] not in known
    }


def load_settings(**overrides: Any) -> Settings:
    """``Settings(**overrides)``, with validation errors turned into one ``SettingsError``:
    one line naming each bad setting as the operator wrote it (an override by its keyword)
    and the value it had. Unknown ``VORTEX_*`` variables get a WARNING naming the closest
    setting."""
    return load_settings_from(overrides)


def load_settings_from(overrides: Mapping[str, Any], *,
                       named: Mapping[str, str] | None = None) -> Settings:
    """``load_settings(**overrides)`` for a front end whose operator wrote the overrides under
    its own names: ``named`` maps a setting to that name (the demo's ``{"port": "--port"}``),
    which the errors use."""
    try:
        unknown = unknown_variables()
    except UnicodeDecodeError as exc:
        raise _invalid(f"{ENV_FILE}: not UTF-8 text (byte {exc.start}: {exc.reason})"
                       ) from None
    for name, close in unknown.items():
        logger.warning("unknown setting %s is ignored%s", name,
                       f" (did you mean {close}?)" if close else "")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        origins = _Origins(overrides, named or {})
        raise _invalid(*(origins.problem(err) for err in exc.errors())) from None


class _Origins:
    """Where each setting's value came from, by the sources' precedence, and so how the
    operator wrote its name: ``where`` heads an error line, ``name`` goes inside a sentence."""

    def __init__(self, overrides: Mapping[str, Any], named: Mapping[str, str]) -> None:
        self._overrides, self._named = overrides, named
        self._env = {k.upper(): k for k in os.environ}
        self._env_file = _env_file_lines()
        path, by = _config_file(overrides)
        self._yaml_path = path
        self._yaml = {k: key for k, (_, key) in _read_yaml(path, by).items()} if path else {}

    def _origin(self, field: str) -> tuple[str, str, bool]:
        """(where, name, is the default)."""
        env = env_name(field)
        if field in self._overrides:
            name = self._named.get(field, field)
            return name, name, False
        if env in self._env:
            return self._env[env], self._env[env], False
        if env.lower() in self._env_file:
            return _env_file_name(env, self._env_file), env, False
        if field in self._yaml:
            return f"{self._yaml_path}: {self._yaml[field]}", self._yaml[field], False
        return env, env, True

    def name(self, field: str) -> str:
        return self._origin(field)[1]

    def problem(self, err: Any) -> str:
        """One pydantic error as ``<where>: <reason> (got <value>)``."""
        option = (err.get("ctx") or {}).get("error")
        if isinstance(option, OptionError):
            field, reason, value = option.name, option.explain(self.name), option.value
        else:
            field = str(err["loc"][0]) if err["loc"] else ""
            reason, value = _reason(err, field), err.get("input") if field else _SECRET
        if not field:
            return reason
        where, _, default = self._origin(field)
        shown = _SECRET if field == "token" else value
        got = "" if shown is _SECRET else f" (got {shown!r}{', the default' if default else ''})"
        return f"{where}: {reason}{got}"


_REASONS = {
    "float_parsing": "must be a number", "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "int_parsing": "must be an integer", "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text", "path_type": "must be a path",
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
}


def _reason(err: Any, field: str) -> str:
    """A pydantic error in this module's words (no "Input should be", no "Value error,")."""
    if err["type"] == "literal_error" and field in Settings.model_fields:
        choices = get_args(Settings.model_fields[field].annotation)
        return "must be one of " + ", ".join(str(c) for c in choices)
    if err["type"] in _REASONS:
        return _REASONS[err["type"]].format(**(err.get("ctx") or {}))
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg.replace("Input should be", "must be")
