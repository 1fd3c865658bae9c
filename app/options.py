"""The monitor's options and the one place their rules live (outside app.monitor, so that
the settings module can import it without importing the monitor).

``VRAMMonitor(...)`` and ``Settings`` (``VORTEX_*``, ``config.yaml``) both go through
``check_options``, so a rule cannot drift into two. A bad value is an ``OptionError`` (a
``ValueError``) that names the option; the settings layer names the variable the operator set.
Every number has an upper bound too: ``VORTEX_HARD_LIMIT_GB=1e300`` is a typo, not a card,
and converting it to bytes would overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GB = 1_000_000_000
MB = 1_000_000
LIMIT_BASES = ("allocated", "reserved")
MAX_GB = 1e6  # a petabyte: far above any card, far below an overflow
MAX_MB = MAX_GB * 1000
MAX_S = 1e9  # about 31 years
MAX_COUNT = 1_000_000


class OptionError(ValueError):
    """A bad monitor option: ``name`` is the argument, ``value`` what it was given; ``why``
    may name another option as ``{0}`` (``related``), so each layer names it its own way."""

    def __init__(self, name: str, value: Any, why: str, related: tuple[str, ...] = ()) -> None:
        self.name, self.value, self.related = name, value, related
        self._why = why
        super().__init__(f"{name}={value!r} {self.why}")

    @property
    def why(self) -> str:
        return self.explain(lambda option: option)

    def explain(self, namer: Any) -> str:
        """``why`` with the related options named by ``namer`` (an option -> a name)."""
        return self._why.format(*(namer(r) for r in self.related))


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    soft_limit_bytes: int
    hard_limit_bytes: int
    emergency_cleanup: bool
    limit_basis: str
    leak_threshold_bytes: int
    leak_window: int
    cleanup_cooldown_s: float
    cleanup_wait_s: float
    hysteresis_bytes: int
    snapshot_interval_s: float
    stall_after_s: float
    required_bytes: int
    python_warnings: bool
    admission_window: int
    admission_quantile: float
    admission_margin: float
    not_producing_after: int


def number(name: str, value: Any, *, above: float | None = None,
           at_least: float | None = None, at_most: float, why: str | None = None) -> float:
    """``value`` as a finite float in range, or an ``OptionError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OptionError(name, value, "must be a finite number")
    if above is not None and not value > above:
        raise OptionError(name, value, why or f"must be above {above:g}")
    if at_least is not None and not value >= at_least:
        raise OptionError(name, value, why or f"must be >= {at_least:g}")
    if value > at_most:
        raise OptionError(name, value, f"must be at most {at_most:g}")
    return float(value)


def count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise OptionError(name, value, f"must be an integer in [1, {MAX_COUNT}]")
    return value


def check_options(*, soft_limit_gb: Any = 11.0, hard_limit_gb: Any = 11.5,
                  emergency_cleanup: Any = True, limit_basis: Any = "allocated",
                  leak_threshold_mb: Any = 100.0, leak_window: Any = 100,
                  cleanup_cooldown_s: Any = 30.0, cleanup_wait_s: Any = 10.0,
                  soft_limit_hysteresis_mb: Any = 100.0, snapshot_interval_s: Any = 60.0,
                  stall_after_s: Any = 300.0, required_gb: Any = 11.8,
                  python_warnings: Any = True, admission_window: Any = 100,
                  admission_quantile: Any = 0.9, admission_margin: Any = 0.05,
                  not_producing_after: Any = 20) -> MonitorOptions:
    """Every rule of every option; the defaults are the task card's."""
    soft = number("soft_limit_gb", soft_limit_gb, above=0, at_most=MAX_GB)
    if isinstance(hard_limit_gb, int | float) and not isinstance(hard_limit_gb, bool) \
            and hard_limit_gb <= soft:
        raise OptionError("hard_limit_gb", hard_limit_gb, f"must be above {{0}} ({soft:g})",
                          ("soft_limit_gb",))
    hard = number("hard_limit_gb", hard_limit_gb, above=0, at_most=MAX_GB)
    if limit_basis not in LIMIT_BASES:
        raise OptionError("limit_basis", limit_basis, f"must be one of {', '.join(LIMIT_BASES)}")
    quantile = number("admission_quantile", admission_quantile, above=0, at_most=1)
    margin = number("admission_margin", admission_margin, at_least=0, at_most=0.25)
    hysteresis = number("soft_limit_hysteresis_mb", soft_limit_hysteresis_mb, at_least=0,
                        at_most=MAX_MB)
    if hysteresis * MB >= soft * GB:
        raise OptionError("soft_limit_hysteresis_mb", soft_limit_hysteresis_mb,
                          f"must be below the soft limit {{0}} ({soft:g} GB)",
                          ("soft_limit_gb",))
    return MonitorOptions(
        soft_limit_bytes=int(soft * GB),
        hard_limit_bytes=int(hard * GB),
        emergency_cleanup=bool(emergency_cleanup),
        limit_basis=limit_basis,
        leak_threshold_bytes=int(number("leak_threshold_mb", leak_threshold_mb, above=0,
                                        at_most=MAX_MB) * MB),
        leak_window=count("leak_window", leak_window),
        cleanup_cooldown_s=number("cleanup_cooldown_s", cleanup_cooldown_s, at_least=0,
                                  at_most=MAX_S),
        cleanup_wait_s=number("cleanup_wait_s", cleanup_wait_s, at_least=0, at_most=MAX_S),
        hysteresis_bytes=int(hysteresis * MB),
        snapshot_interval_s=number("snapshot_interval_s", snapshot_interval_s, at_least=0,
                                   at_most=MAX_S),
        stall_after_s=number("stall_after_s", stall_after_s, above=0, at_most=MAX_S),
        required_bytes=int(number("required_gb", required_gb, above=0, at_most=MAX_GB) * GB),
        python_warnings=bool(python_warnings),
        admission_window=count("admission_window", admission_window),
        admission_quantile=quantile,
        admission_margin=margin,
        not_producing_after=count("not_producing_after", not_producing_after),
    )
