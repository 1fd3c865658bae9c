"""Settings: defaults < config.yaml (the task card's Director shape) < settings.env < environment.

Every setting is ``VORTEX_<NAME>`` in the environment and in ``settings.env``. A bad value
fails start-up with ``SettingsError`` naming the variable.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

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
    """A setting is invalid; the message names the environment variable."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


class _DirectorYamlSource(PydanticBaseSettingsSource):
    """Reads the task card's ``config.yaml`` (``vram_limits``/``monitoring`` sections) from
    ``VORTEX_CONFIG_FILE``; other sections of a Director config are left alone."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the mapping whole

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        path = Path(self._path)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise SettingsError(f"{env_name('config_file')}={path}: not UTF-8 text (byte "
                                f"{exc.start}: {exc.reason})") from None
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"{env_name('config_file')}={path}: cannot read it: {exc}") from exc
        if not isinstance(doc, dict):
            raise SettingsError(f"{env_name('config_file')}={path}: expected a mapping at the top")
        values: dict[str, Any] = {}
        for section, keys in _YAML_KEYS.items():
            body = doc.get(section) or {}
            if not isinstance(body, dict):
                raise SettingsError(f"{path}: {section} must be a mapping")
            unknown = set(body) - set(keys)
            if unknown:
                raise SettingsError(
                    f"{path}: unknown key(s) in {section}: {', '.join(sorted(unknown))} "
                    f"(known: {', '.join(keys)})"
                )
            values.update({keys[k]: v for k, v in body.items()})
        return values


class Settings(BaseSettings):
    """The Director's settings: ``VORTEX_*`` variables, ``settings.env`` and the task card's
    ``config.yaml`` (``VORTEX_CONFIG_FILE``). ``load_settings()`` builds one with errors as
    one line naming the variable; ``monitor_kwargs()`` gives ``VRAMMonitor``'s arguments."""

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
        or ``VORTEX_TOKEN``, and one that an HTTP header can carry."""
        if self.token_file is not None:
            if self.token is not None:
                raise ValueError(f"set one of {env_name('token')} and {env_name('token_file')}")
            try:
                text = self.token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"{env_name('token_file')}={self.token_file}: cannot read it: {exc}"
                ) from None
            if not text:
                raise ValueError(f"{env_name('token_file')}={self.token_file} is empty")
            self.token = SecretStr(text)
        if self.token is not None:
            value = self.token.get_secret_value()
            if not value or not all("!" <= c <= "~" for c in value):
                source = env_name("token_file" if self.token_file else "token")
                raise ValueError(f"{source}: the token must be printable ASCII without spaces")
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
        path = getattr(init_settings, "init_kwargs", {}).get("config_file") or os.environ.get(
            env_name("config_file")
        )
        return (
            init_settings, env_settings, dotenv_settings,
            _DirectorYamlSource(settings_cls, str(path) if path else None),
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
    """``Settings(**overrides)``, with validation errors turned into one ``SettingsError``
    whose lines name each bad variable and the value it had. Unknown ``VORTEX_*`` variables
    get a WARNING naming the closest setting."""
    try:
        unknown = unknown_variables()
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{ENV_FILE}: not UTF-8 text (byte {exc.start}: {exc.reason})"
                            ) from None
    for name, close in unknown.items():
        logger.warning("unknown setting %s is ignored%s", name,
                       f" (did you mean {close}?)" if close else "")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            option = (err.get("ctx") or {}).get("error")
            if isinstance(option, OptionError):
                lines.append(f"{env_name(option.name)}: {option.explain(env_name)} "
                             f"(got {option.value!r})")
                continue
            loc = ".".join(str(p) for p in err["loc"])
            name = env_name(loc) if loc else "settings"
            got = "" if not loc else f" (got {err.get('input')!r})"
            lines.append(f"{name}: {err['msg']}{got}")
        raise SettingsError("invalid settings: " + "; ".join(lines)) from None
