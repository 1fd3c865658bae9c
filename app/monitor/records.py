"""Value objects the monitor hands out. Bytes are ints; GB (10^9 bytes) only at the edges."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple

GB = 1_000_000_000
MB = 1_000_000
BUDGET_SLACK_BYTES = 2 << 20


def to_gb(nbytes: float) -> float:
    """Bytes to GB for people: 10^9 bytes, three decimals (a megabyte is the last digit)."""
    return round(nbytes / GB, 3)


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A resident model: bytes it holds on the device, and the budget it was given."""

    name: str
    vram_bytes: int
    budget_bytes: int | None
    source: str  # "allocator_delta" (track_model_load) or "module_storages" (register_model)

    @property
    def over_budget(self) -> bool:
        """Past the budget by more than allocator rounding (2 MiB, or 0.1% of a large budget):
        every tensor is rounded up, so a model sized exactly to its budget lands a little over."""
        if self.budget_bytes is None:
            return False
        slack = max(BUDGET_SLACK_BYTES, self.budget_bytes // 1000)
        return self.vram_bytes > self.budget_bytes + slack


@dataclass(frozen=True, slots=True)
class LeakTrend:
    """The slope of allocated memory after each generation, over the last window."""

    samples: int
    bytes_per_generation: float
    generations_to_hard_limit: float | None  # None when flat or falling


@dataclass(frozen=True, slots=True)
class LeakFinding:
    """Allocated memory after generations grew past the threshold over ``generations`` slots."""

    initial_bytes: int
    current_bytes: int
    generations: int  # slots between the two figures
    total_generations: int  # the monitor's generation count when it was found
    bytes_per_generation: float
    generations_to_hard_limit: float | None

    @property
    def delta_bytes(self) -> int:
        return self.current_bytes - self.initial_bytes


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """One cleanup that ran. ``reason`` says who asked for it: ``soft_limit``, ``hard_limit``,
    ``oom``, ``http``, ``manual`` (a direct call) or ``admission``."""

    reason: str
    freed_bytes: int
    reserved_before_bytes: int
    reserved_after_bytes: int
    allocated_bytes: int
    duration_s: float
    timestamp: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class PreflightResult:
    available_bytes: int
    required_bytes: int
    total_bytes: int


@dataclass(slots=True)
class GenerationRecord:
    """One slot's memory, yielded by ``VRAMMonitor.generation()``.

    The generation loop owns it while the slot runs; the monitor fills in the ``*_after``
    figures, ``delta_bytes`` and ``peak_bytes`` on exit and never touches it again.
    """

    slot: int | None
    allocated_before_bytes: int
    allocated_after_bytes: int = 0
    delta_bytes: int = 0
    peak_bytes: int = 0
    stage_peaks_bytes: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    status: str = "running"  # then "ok", "failed" or "oom"
    failed_stage: str | None = None
    measured: bool = True  # False when the backend could not be read at start or end

    @property
    def activation_peak_bytes(self) -> int:
        """How far the slot rose above what was resident when it started."""
        return max(0, self.peak_bytes - self.allocated_before_bytes)


@dataclass(frozen=True, slots=True)
class HistogramState:
    """A fixed-bucket histogram, frozen: cumulative counts per upper bound, then +Inf."""

    bounds: tuple[float, ...]
    cumulative_counts: tuple[int, ...]  # len(bounds) + 1, the last is the total count
    total: float

    @property
    def count(self) -> int:
        return self.cumulative_counts[-1]


class Histograms(NamedTuple):
    peak: HistogramState  # highest allocated bytes during each generation
    activation: HistogramState  # peak minus the level before the generation
    delta: HistogramState  # allocated after minus before


@dataclass(frozen=True, slots=True)
class Liveness:
    """Whether the generation loop moves: the slot running and for how long, the last one's end."""

    running: bool
    slot: int | None
    running_s: float  # 0 when idle
    stalled: bool  # the running slot passed stall_after_s
    last_generation_at: float | None  # Unix time the last generation ended; None before one
    post_generation_allocated_bytes: int | None  # allocated after it: the level leaks show in


@dataclass(frozen=True, slots=True)
class MonitorCounters:
    soft_limit_violations: int
    hard_limit_violations: int
    emergency_cleanups: int
    cleanup_freed_bytes: int
    generations: int
    generations_failed: int
    ooms_caught: int
    leak_warnings: int
    backend_errors: int  # failed reads of the device by the monitor: the guards were blind
    cleanup_failures: int


@dataclass(frozen=True, slots=True)
class VRAMSnapshot:
    """The monitor at one moment. The first seven fields are the task card's JSON record."""

    timestamp: str
    event: str
    slot: int | None
    vram_usage_gb: float
    vram_allocated_gb: float
    vram_reserved_gb: float
    models: Mapping[str, float]
    device: str
    device_name: str
    device_uuid: str | None  # as nvidia-smi prints it; cuda:N moves with CUDA_VISIBLE_DEVICES
    limit_basis: str
    usage_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    stage_peak_allocated_bytes: int  # allocator peak since the running (or last) stage began
    inactive_split_bytes: int
    fragmentation_ratio: float  # inactive split / reserved: cached memory empty_cache can't return
    device_free_bytes: int
    device_total_bytes: int
    non_torch_bytes: int
    num_alloc_retries: int
    num_ooms: int
    soft_limit_bytes: int
    hard_limit_bytes: int
    soft_limit_gb: float
    hard_limit_gb: float
    generation_count: int
    soft_limit_violations: int
    hard_limit_violations: int
    emergency_cleanups: int
    leak_warnings: int
    leak_bytes_per_generation: float
    leak_generations_to_hard_limit: float | None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["models"] = dict(self.models)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def frozen_mapping(d: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(d))
