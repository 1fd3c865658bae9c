"""Value objects the monitor hands out. Bytes are ints; GB (10^9 bytes) only at the edges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

# Re-exported: the monitor's modules take the units from here.
from app.units import GB as GB
from app.units import MB as MB
from app.units import fmt_gb
from app.units import to_gb as to_gb

BUDGET_SLACK_BYTES = 2 << 20


def utc_timestamp(unix_s: float | None = None) -> str:
    """ISO 8601 in UTC with milliseconds and a Z: now, or the Unix time given."""
    t = datetime.now(UTC) if unix_s is None else datetime.fromtimestamp(unix_s, UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A resident model: bytes it holds on the device, and the budget it was given."""

    name: str
    vram_bytes: int
    budget_bytes: int | None
    # "allocator_delta" (track_model_load), "module_storages" (register_model), or
    # "unmeasured" (loaded while the backend could not be read)
    source: str

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
        """The fields as a plain dict (the JSON the control plane sends)."""
        return {name: getattr(self, name) for name in _CLEANUP_FIELDS}


_CLEANUP_FIELDS = tuple(f.name for f in fields(CleanupResult))

# CleanupAttempt.status -> what a message says of it
_ATTEMPTS = {
    "nothing_to_release": "cleanup skipped: the allocator cache held nothing to release",
    "disabled": "cleanup skipped: emergency_cleanup is off",
    "cooling_down": "cleanup skipped: cooling down, the next one in {retry}",
    "futile": "cleanup skipped: the last one freed nothing in this very state",
    "unreadable": "cleanup skipped: the allocator could not be read",
    "failed": "cleanup failed (logged as cleanup_failed)",
}


@dataclass(frozen=True, slots=True)
class CleanupAttempt:
    """What became of the cleanup a guard attempted (the task card's "refuse, attempt
    cleanup"). ``status``: ``ran`` (``result`` says what it freed), or why none ran:
    ``nothing_to_release`` (the cache held nothing that ``empty_cache`` returns), ``disabled``
    (``emergency_cleanup`` is off), ``cooling_down`` (within ``cleanup_cooldown_s`` of the
    last of its kind: ``retry_after_s``), ``futile`` (the last cleanup freed nothing in this
    very state), ``unreadable`` (the allocator could not be read) or ``failed`` (it raised)."""

    status: str
    result: CleanupResult | None = None
    retry_after_s: float | None = None

    @property
    def freed_bytes(self) -> int:
        """Reserved bytes the cleanup returned; 0 when none ran."""
        return 0 if self.result is None else self.result.freed_bytes

    def describe(self) -> str:
        """For a message: ``cleanup ran and freed 0.150GB``, ``cleanup skipped: ...``."""
        if self.result is not None:
            return f"cleanup ran and freed {fmt_gb(self.result.freed_bytes)}"
        return _ATTEMPTS[self.status].format(retry=f"{self.retry_after_s or 0:.1f}s")


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

    ``peak_bytes`` and ``stage_peaks_bytes`` (each stage's peak, by name) are absolute
    allocated bytes, the resident models included: not the rise above the level before the
    slot or the stage (``activation_peak_bytes`` is the slot's rise).
    ``peak_over_hard_limit``: the peak crossed the hard limit, wherever the slot ended (a near
    miss, which ``check_limits`` after the slot does not see; the monitor counts them). It is
    read from the allocated peak on either limit basis, so on ``reserved`` a slot whose cache
    alone crossed the limit is not flagged.
    """

    slot: int | None
    allocated_before_bytes: int
    allocated_after_bytes: int = 0
    delta_bytes: int = 0
    peak_bytes: int = 0
    stage_peaks_bytes: dict[str, int] = field(default_factory=dict)  # absolute, models in
    duration_s: float = 0.0
    status: str = "running"  # then "ok", "failed" or "oom"
    failed_stage: str | None = None
    measured: bool = True  # False when the backend could not be read at start or end
    scale: float = 1.0  # the share of its full-size activations the slot ran at
    wanted_peak_bytes: int = 0  # the peak a refused or shrunk allocation would have reached
    fitted: bool = False  # an allocation was shrunk to fit (fit_allocation)
    peak_over_hard_limit: bool = False
    # Allocator OOMs inside the slot that did not end it: a kernel caught them and went on
    # (cuDNN's next plan when a workspace does not fit). Not a failure; slower at worst.
    ooms_absorbed: int = 0

    @property
    def activation_peak_bytes(self) -> int:
        """How far the slot rose above what was resident when it started."""
        return max(0, self.peak_bytes - self.allocated_before_bytes)

    @property
    def outcome(self) -> str:
        """``full``, ``degraded`` (ran below full size), ``aborted``; ``running`` before."""
        if self.status == "running":
            return "running"
        if self.status != "ok":
            return "aborted"
        return "degraded" if self.scale < 1.0 or self.fitted else "full"


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
    lost_in_a_row: int = 0  # slots skipped or aborted since the last one produced


@dataclass(frozen=True, slots=True)
class ReadinessState:
    """What ``/readyz`` answers, and ``icn_vortex_vram_ready``: one rule for both.
    ``reason``: ``None`` when ready, else ``not_started`` (pre-flight or models missing),
    ``stalled``, ``not_producing`` or ``shutting_down``."""

    ready: bool
    reason: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class TrackerSummary:
    """The slots' figures at one moment (``GenerationTracker.summary``)."""

    generations: int
    failed: int
    ooms: int
    leak_warnings: int
    outcomes: Mapping[str, int]
    admissions: Mapping[str, int]
    trend: LeakTrend
    liveness: Liveness
    forecast: Forecast
    peaks_over_hard_limit: int
    ooms_absorbed: int


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
    generations_peak_over_hard_limit: int  # near misses included: see GenerationRecord
    ooms_absorbed: int  # allocator OOMs a kernel caught and retried inside a slot


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
    # 1 - largest_allocatable / free: the share of free memory (device room and the whole
    # cache) that one allocation cannot get; works with expandable segments too
    fragmentation_ratio: float
    fragmentation: Mapping[str, Any]  # placement.Fragmentation: inactive split, releasable, ...
    allocator_settings: Mapping[str, Any]  # PYTORCH_ALLOC_CONF as the allocator applies it
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
    post_generation_allocated_bytes: int | None
    generations_failed: int
    ooms_caught: int
    generations_peak_over_hard_limit: int  # slots whose peak crossed it, ended over it or not
    ooms_absorbed: int  # allocator OOMs a kernel caught and retried inside a slot: no failure
    backend_errors: int
    cleanup_failures: int
    slot_outcomes: Mapping[str, int]  # full, degraded, skipped, aborted
    admissions: Mapping[str, int]  # admit, cleanup, refuse
    running_slot: int | None
    running_s: float
    stalled: bool
    last_generation_at: str | None  # when the last generation ended, UTC
    lost_slots_in_a_row: int  # skipped or aborted since the last slot produced
    last_cleanup: CleanupResult | None
    forecast_samples: int  # generations the admission forecast is built on; 0: none yet
    forecast_activation_bytes: int
    forecast_peak_bytes: int  # on the limit basis, from now: current usage when no history
    forecast_headroom_bytes: int  # hard limit minus the forecast peak
    # Optional (a snapshot built without them, or by an older Director, lacks them):
    last_slot: int | None = None  # the slot number of the last slot that ended in generation()
    gpu_utilization_percent: int | None = None  # from NVML; None on the simulated card
    gpu_temperature_celsius: int | None = None
    gpu_power_watts: float | None = None
    gpu_power_limit_watts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain dicts and values: the JSON record of ``/vram/snapshot``."""
        d = {name: getattr(self, name) for name in _SNAPSHOT_FIELDS}
        d["models"] = dict(self.models)
        d["slot_outcomes"] = dict(self.slot_outcomes)
        d["admissions"] = dict(self.admissions)
        d["fragmentation"] = dict(self.fragmentation)
        d["allocator_settings"] = dict(self.allocator_settings)
        if self.last_cleanup is not None:
            d["last_cleanup"] = self.last_cleanup.to_dict()
        return d

    def to_json(self) -> str:
        """``to_dict()`` as JSON text."""
        return self.to_json_bytes().decode()

    def to_json_bytes(self) -> bytes:
        """``to_dict()`` as UTF-8 JSON bytes."""
        # orjson: ~1.6 µs for a snapshot where json.dumps takes ~18 µs, on the endpoint that
        # dashboards and `vortex-vram top` poll every second.
        return orjson.dumps(self.to_dict())


_SNAPSHOT_FIELDS = tuple(f.name for f in fields(VRAMSnapshot))  # once: fields() is slow


def frozen_mapping(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class Forecast:
    """What the next slot's activations will take, from the slots before it (nominal: as if
    it ran at full size). Bytes above the level the slot starts from."""

    samples: int  # generations the forecast is built on; 0: no history yet
    activation_bytes: int  # the slot's peak above its starting level, margin included
    quantile_bytes: int  # the high quantile the margin is added to
    stage_bytes: Mapping[str, int]  # the same, per stage, margin included


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision ``VRAMMonitor.admit()`` takes before a slot starts.

    ``decision``: ``"admit"`` (the forecast peak fits), ``"cleanup"`` (it fits once the
    allocator cache is released: the monitor released it before answering) or ``"refuse"``
    (it does not fit even then). ``activation_scale`` is the share of the forecast activation
    that fits under the hard limit, in [0, 1]: 1.0 unless refused; a Director that runs a
    refused slot anyway scales its activations (resolution, frame count) by it.
    """

    decision: str
    predicted_peak_bytes: int  # on the limit basis
    headroom_bytes: int  # hard limit minus the predicted peak; negative when refused
    activation_scale: float
    reason: str
    slot: int | None = None
    forecast_activation_bytes: int = 0
    # "forecast": from the slots before; "rehearsal": the slot's presets replayed on a copy
    method: str = "forecast"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
