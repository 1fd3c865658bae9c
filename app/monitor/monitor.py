"""The VRAM monitor: limits, guards, model registry, snapshots; it drives the slots'
bookkeeping (``GenerationTracker``) and the cleanups (``CleanupRunner``).

Thread model: three owners, one lock each. The monitor's ``_lock`` guards the limit state,
its counters and the model registry; the tracker's guards everything about slots; the
runner's guards the cleanup clock and totals. Each method reads the backend once, takes a
lock briefly to copy or update state, and does the slow work (formatting, logging,
``warnings.warn``, gc, ``empty_cache``) after releasing it.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from app.backends import AllocatorSample, MemoryBackend, OutOfMemoryError, default_backend
from app.errors import (
    CleanupCooldownError,
    MemoryLeakWarning,
    MemoryPressureError,
    MemoryPressureWarning,
    VortexInitializationError,
)
from app.monitor.cleanup import CleanupRunner
from app.monitor.generations import GenerationTracker
from app.monitor.modules import module_bytes
from app.monitor.records import (
    GB,
    MB,
    CleanupResult,
    GenerationRecord,
    HistogramState,
    LeakFinding,
    LeakTrend,
    ModelRecord,
    MonitorCounters,
    PreflightResult,
    VRAMSnapshot,
    frozen_mapping,
    to_gb,
    utc_timestamp,
)

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)
snapshot_logger = logging.getLogger("app.monitor.snapshots")

LIMIT_BASES = ("allocated", "reserved")
_BASIS_INDEX = {"allocated": 0, "reserved": 1}  # fields of AllocatorSample
ERROR_LOG_INTERVAL_S = 10.0  # a failing backend logs at most this often (every failure counts)


def _ctx(context: str) -> str:
    return f" [{context}]" if context else ""


class VRAMMonitor:
    """Watches one device against a soft and a hard limit.

    ``limit_basis`` picks the figure the limits apply to: ``"allocated"`` (the task card's
    default: bytes in live tensors) or ``"reserved"`` (what the process really holds from the
    device, cache included; only there can an emptied cache bring usage back down).
    """

    def __init__(
        self,
        soft_limit_gb: float = 11.0,
        hard_limit_gb: float = 11.5,
        emergency_cleanup: bool = True,
        *,
        backend: MemoryBackend | None = None,
        limit_basis: str = "allocated",
        leak_threshold_mb: float = 100.0,
        leak_window: int = 100,
        cleanup_cooldown_s: float = 30.0,
        soft_limit_hysteresis_mb: float = 100.0,
        snapshot_interval_s: float = 60.0,
        required_gb: float = 11.8,
    ) -> None:
        _require(soft_limit_gb > 0, "soft_limit_gb", soft_limit_gb, "must be positive")
        _require(
            hard_limit_gb > soft_limit_gb, "hard_limit_gb", hard_limit_gb,
            f"must be above soft_limit_gb ({soft_limit_gb})",
        )
        _require(limit_basis in LIMIT_BASES, "limit_basis", limit_basis,
                 f"must be one of {LIMIT_BASES}")
        _require(leak_threshold_mb > 0, "leak_threshold_mb", leak_threshold_mb, "must be positive")
        _require(
            isinstance(leak_window, int) and leak_window >= 1, "leak_window", leak_window,
            "must be an integer >= 1",
        )
        _require(cleanup_cooldown_s >= 0, "cleanup_cooldown_s", cleanup_cooldown_s, "must be >= 0")
        _require(
            0 <= soft_limit_hysteresis_mb * MB < soft_limit_gb * GB, "soft_limit_hysteresis_mb",
            soft_limit_hysteresis_mb, "must be >= 0 and below the soft limit",
        )
        _require(snapshot_interval_s >= 0, "snapshot_interval_s", snapshot_interval_s,
                 "must be >= 0")
        _require(required_gb > 0, "required_gb", required_gb, "must be positive")

        self._backend: MemoryBackend = backend if backend is not None else default_backend()
        self.soft_limit_bytes = int(soft_limit_gb * GB)
        self.hard_limit_bytes = int(hard_limit_gb * GB)
        self._rearm_bytes = self.soft_limit_bytes - int(soft_limit_hysteresis_mb * MB)
        self.emergency_cleanup_enabled = bool(emergency_cleanup)
        self.limit_basis = limit_basis
        self._basis = _BASIS_INDEX[limit_basis]
        self.leak_threshold_bytes = int(leak_threshold_mb * MB)
        self.leak_window = leak_window
        self.cleanup_cooldown_s = float(cleanup_cooldown_s)
        self.snapshot_interval_s = float(snapshot_interval_s)
        self.required_bytes = int(required_gb * GB)

        self._slots = GenerationTracker(leak_window, self.leak_threshold_bytes,
                                        self.hard_limit_bytes)
        self._cleaner = CleanupRunner(self._backend, self.cleanup_cooldown_s)
        self._lock = threading.Lock()
        # --- everything below is guarded by _lock ---
        self._soft_armed = True
        self._soft_violations = 0
        self._hard_violations = 0
        self._monitor_errors = 0
        self._last_error_log: float | None = None  # monotonic
        self._models: dict[str, ModelRecord] = {}
        self._last_info_snapshot: float | None = None  # monotonic
        self._preflight: PreflightResult | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, backend: MemoryBackend | None = None
    ) -> VRAMMonitor:
        return cls(backend=backend, **settings.monitor_kwargs())

    # ------------------------------------------------------------------ read-only figures

    @property
    def backend(self) -> MemoryBackend:
        return self._backend

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def soft_limit_violations(self) -> int:
        return self._soft_violations

    @property
    def hard_limit_violations(self) -> int:
        return self._hard_violations

    @property
    def emergency_cleanups(self) -> int:
        return self._cleaner.count

    @property
    def generation_count(self) -> int:
        return self._slots.generations

    @property
    def preflight_passed(self) -> bool:
        return self._preflight is not None

    def usage_bytes(self) -> int:
        """The figure the limits apply to, read now."""
        return self._backend.sample()[self._basis]

    def counters(self) -> MonitorCounters:
        generations, failed, ooms, leaks = self._slots.counts()
        cleanups, freed = self._cleaner.totals()
        with self._lock:
            soft, hard, errors = self._soft_violations, self._hard_violations, self._monitor_errors
        return MonitorCounters(soft, hard, cleanups, freed, generations, failed, ooms, leaks,
                               errors)

    def histograms(self) -> tuple[HistogramState, HistogramState]:
        """(peak bytes, delta bytes) of the generations so far."""
        return self._slots.histograms()

    def recent_generations(self) -> list[GenerationRecord]:
        return self._slots.recent()

    def last_cleanup(self) -> CleanupResult | None:
        return self._cleaner.last()

    def cleanup_retry_after(self) -> float:
        """Seconds until a cooldown-bound cleanup may run again; 0 when it may run now."""
        return self._cleaner.retry_after()

    # ------------------------------------------------------------------ guards (hot path)

    def check_limits(self, context: str = "") -> int | None:
        """Compare usage with the limits; returns the usage in bytes.

        Above the soft limit: one WARNING log, one count and one ``MemoryPressureWarning``
        per excursion (re-armed once usage falls below the soft limit minus the hysteresis),
        and an emergency cleanup when enabled and not cooling down. Above the hard limit:
        an ERROR log, a cleanup and ``MemoryPressureError`` on every call; on the reserved
        basis a cleanup that brings usage back under the hard limit clears the error.

        Fails open: if the backend cannot be read, the check counts a monitor error, logs
        (rate-limited) and returns ``None``; the slot goes on, and an OOM it then meets is
        still caught by ``generation()``.
        """
        try:
            usage = self._backend.sample()[self._basis]
        except Exception as exc:
            self._backend_failed("check_limits", exc)
            return None
        with self._lock:
            soft_edge = False
            if usage > self.soft_limit_bytes:
                soft_edge = self._soft_armed
                if soft_edge:
                    self._soft_armed = False
                    self._soft_violations += 1
            elif usage <= self._rearm_bytes:
                self._soft_armed = True
            hard = usage > self.hard_limit_bytes
            if hard:
                self._hard_violations += 1
        if soft_edge or hard:
            self._on_pressure(usage, soft_edge, hard, context)
        return usage

    def check_allocation(self, requested_bytes: int, context: str = "") -> int | None:
        """Refuse, before it happens, an allocation that would take usage past the hard limit.

        Returns the projected usage in bytes. On the reserved basis the projection assumes
        the cache can be reused: ``max(reserved, allocated + requested)``. Fails open like
        ``check_limits`` (returns ``None``) when the backend cannot be read.
        """
        if requested_bytes < 0:
            raise ValueError(f"requested_bytes must be >= 0, got {requested_bytes}")
        try:
            s = self._backend.sample()
        except Exception as exc:
            self._backend_failed("check_allocation", exc)
            return None
        usage = s[self._basis]
        projected = s.allocated_bytes + requested_bytes
        if self._basis == 1:
            projected = max(s.reserved_bytes, projected)
        if projected <= self.hard_limit_bytes:
            return projected
        with self._lock:
            self._hard_violations += 1
        msg = (
            f"Allocation refused{_ctx(context)}: current_usage={usage / GB:.2f}GB, "
            f"requested={requested_bytes / GB:.2f}GB, "
            f"hard_limit={self.hard_limit_bytes / GB:.2f}GB "
            f"(would reach {projected / GB:.2f}GB)"
        )
        logger.error(msg, extra={"vram_event": "allocation_refused", "context": context,
                                 "current_usage_gb": to_gb(usage),
                                 "requested_gb": to_gb(requested_bytes),
                                 "hard_limit_gb": to_gb(self.hard_limit_bytes),
                                 "device": self.device})
        if self.emergency_cleanup_enabled:
            self._try_auto_cleanup("hard_limit")
        raise MemoryPressureError(msg, reason="allocation_refused")

    def _on_pressure(self, usage: int, soft_edge: bool, hard: bool, context: str) -> None:
        soft_msg = None
        if soft_edge:
            soft_msg = (
                f"VRAM soft limit exceeded{_ctx(context)}: current_usage={usage / GB:.2f}GB, "
                f"soft_limit={self.soft_limit_bytes / GB:.2f}GB, "
                f"delta=+{(usage - self.soft_limit_bytes) / GB:.2f}GB"
            )
            logger.warning(soft_msg, extra={
                "vram_event": "soft_limit_exceeded", "context": context,
                "current_usage_gb": to_gb(usage), "soft_limit_gb": to_gb(self.soft_limit_bytes),
                "delta_gb": to_gb(usage - self.soft_limit_bytes), "device": self.device})
        hard_msg = None
        if hard:
            hard_msg = (
                f"VRAM hard limit exceeded{_ctx(context)}: current_usage={usage / GB:.2f}GB, "
                f"hard_limit={self.hard_limit_bytes / GB:.2f}GB, "
                f"delta=+{(usage - self.hard_limit_bytes) / GB:.2f}GB"
            )
            logger.error(hard_msg, extra={
                "vram_event": "hard_limit_exceeded", "context": context,
                "current_usage_gb": to_gb(usage), "hard_limit_gb": to_gb(self.hard_limit_bytes),
                "delta_gb": to_gb(usage - self.hard_limit_bytes), "device": self.device})
        result = None
        if self.emergency_cleanup_enabled:
            result = self._try_auto_cleanup("hard_limit" if hard else "soft_limit")
        if hard:
            recovered = (
                self._basis == 1 and result is not None
                and result.reserved_after_bytes <= self.hard_limit_bytes
            )
            if not recovered:
                raise MemoryPressureError(hard_msg)
            logger.warning("VRAM back under the hard limit after cleanup%s: %.2fGB",
                           _ctx(context), result.reserved_after_bytes / GB)
        if soft_msg is not None:
            # Only when no error supersedes it: under an "error" warnings filter this raises.
            warnings.warn(MemoryPressureWarning(soft_msg), stacklevel=3)

    # ------------------------------------------------------------------ pre-flight

    def preflight(self, required_gb: float | None = None) -> PreflightResult:
        """Check the card before any model loads.

        Available means what this process can hold: free device memory plus what its
        allocator already reserved, within any per-process cap.
        """
        required = self.required_bytes if required_gb is None else int(required_gb * GB)
        dm = self._backend.device_memory()
        s = self._backend.sample()
        available = min(dm.free_bytes + s.reserved_bytes, dm.total_bytes)
        if available < required:
            raise VortexInitializationError(
                f"Insufficient VRAM: {available / GB:.1f}GB available, {required / GB:.1f}GB "
                "required. Upgrade to RTX 3060 12GB or higher."
            )
        if self.hard_limit_bytes > dm.total_bytes:
            raise VortexInitializationError(
                f"Hard limit {self.hard_limit_bytes / GB:.2f}GB (VORTEX_HARD_LIMIT_GB) exceeds the "
                f"card's total memory {dm.total_bytes / GB:.2f}GB"
            )
        result = PreflightResult(available, required, dm.total_bytes)
        with self._lock:
            self._preflight = result
        logger.info("VRAM pre-flight passed: %.1fGB available, %.1fGB required",
                    available / GB, required / GB)
        return result

    # ------------------------------------------------------------------ model registry

    @contextmanager
    def track_model_load(self, name: str, budget_gb: float | None = None) -> Iterator[None]:
        """Register ``name`` with the allocated bytes its loading adds.

        Load one model at a time inside it: anything else allocated meanwhile counts too.
        Nothing is registered if loading raises.
        """
        budget = _budget_bytes(budget_gb)
        before = self._backend.sample().allocated_bytes
        yield
        after = self._backend.sample().allocated_bytes
        self._register(ModelRecord(name, max(0, after - before), budget, "allocator_delta"))

    def register_model(
        self, name: str, module: torch.nn.Module, budget_gb: float | None = None
    ) -> int:
        """Register an already-loaded module by the unique storages it holds on this device."""
        nbytes = module_bytes(module, self._backend.owns)
        self._register(ModelRecord(name, nbytes, _budget_bytes(budget_gb), "module_storages"))
        return nbytes

    def unregister_model(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)

    def _register(self, record: ModelRecord) -> None:
        with self._lock:
            self._models[record.name] = record
        logger.info("model %s resident: %.2fGB%s", record.name, record.vram_bytes / GB,
                    "" if record.budget_bytes is None
                    else f" (budget {record.budget_bytes / GB:.2f}GB)")
        if record.over_budget:
            logger.warning("model %s over budget: %.2fGB > %.2fGB", record.name,
                           record.vram_bytes / GB, record.budget_bytes / GB)

    def models(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._models.values())

    def get_vram_breakdown(self) -> dict[str, float]:
        """Per-model resident memory in GB."""
        return {m.name: to_gb(m.vram_bytes) for m in self.models()}

    def models_over_budget(self) -> list[str]:
        return [m.name for m in self.models() if m.over_budget]

    def validate_buffers(self, buffers: Mapping[str, int]) -> int:
        """Check that output buffers fit under the hard limit next to what is resident.

        Resident is the larger of current usage and the registered models' sum, so the
        check also works before the models are loaded. Returns the headroom left after the
        buffers, in bytes; raises ``MemoryPressureError`` naming each buffer that does not fit.
        """
        for name, nbytes in buffers.items():
            if not isinstance(nbytes, int) or nbytes < 0:
                raise ValueError(
                    f"buffer {name!r} must be a non-negative int of bytes, got {nbytes!r}")
        with self._lock:
            models_total = sum(m.vram_bytes for m in self._models.values())
        resident = max(self._backend.sample()[self._basis], models_total)
        running, misfits = resident, []
        for name, nbytes in buffers.items():
            running += nbytes
            if running > self.hard_limit_bytes:
                misfits.append(f"{name} ({nbytes / GB:.2f}GB)")
        if misfits:
            raise MemoryPressureError(
                f"Buffers do not fit under hard_limit={self.hard_limit_bytes / GB:.2f}GB next to "
                f"resident models {resident / GB:.2f}GB: {', '.join(misfits)} "
                f"(all buffers {sum(buffers.values()) / GB:.2f}GB, "
                f"headroom {(self.hard_limit_bytes - resident) / GB:.2f}GB)",
                reason="buffers",
            )
        return self.hard_limit_bytes - running

    # ------------------------------------------------------------------ generations

    @contextmanager
    def generation(self, slot: int | None = None) -> Iterator[GenerationRecord]:
        """Measure one slot: delta (allocated after - before) and peak, counted for leaks.

        The allocator's peak register is global per device, so the monitor resets it here
        and in ``stage()`` and folds what it read before each reset into the figures: nothing
        else in the process should reset it while a generation runs. One generation at a
        time per monitor. A ``torch.OutOfMemoryError`` escaping the slot becomes a
        ``MemoryPressureError`` naming the slot and stage, after an emergency cleanup.
        """
        before = self._safe_sample("generation")
        before_bytes = before.allocated_bytes if before else None
        record = self._slots.begin(slot, before_bytes or 0)
        self._safe_reset_peak()
        self._log_periodic_snapshot("pre_generation", slot)
        t0 = time.perf_counter()
        try:
            yield record
        except OutOfMemoryError as exc:
            # Drop the frames' locals so the tensors the failed slot held can be freed.
            traceback.clear_frames(exc.__traceback__)
            oom = exc
        except BaseException:
            self._finish_generation(record, before_bytes, t0, "failed")
            raise
        else:
            self._finish_generation(record, before_bytes, t0, "ok")
            return
        self._finish_generation(record, before_bytes, t0, "oom")
        where = f"slot {slot}" + (f", stage {record.failed_stage}" if record.failed_stage else "")
        logger.error("CUDA out of memory in %s escaped the guards; cleaning up", where)
        self._post_mortem(f"slot{slot}")  # before the cleanup: the history as the OOM saw it
        try:
            self._cleaner.run("oom", respect_cooldown=False)
        except Exception as exc:
            self._backend_failed("emergency cleanup", exc)
        first_line = str(oom).splitlines()[0] if str(oom) else "OutOfMemoryError"
        raise MemoryPressureError(f"CUDA out of memory in {where}: {first_line}",
                                  reason="oom") from oom

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the peak of one stage (one model's forward, say) inside a generation."""
        self._slots.open_stage(name, self._peak_now())
        self._safe_reset_peak()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self._slots.close_stage(name, self._peak_now(), failed)

    def _peak_now(self) -> int:
        s = self._safe_sample("stage")
        return s.peak_allocated_bytes if s else 0

    def _finish_generation(
        self, record: GenerationRecord, before_bytes: int | None, t0: float, status: str
    ) -> None:
        after = self._safe_sample("generation")
        finding = self._slots.finish(
            record, before_bytes,
            None if after is None else (after.allocated_bytes, after.peak_allocated_bytes),
            status, time.perf_counter() - t0,
        )
        self._log_periodic_snapshot("post_generation", record.slot)
        if finding is not None:
            self._report_leak(finding, warn=status == "ok")

    def increment_generation_count(self) -> None:
        """Count a generation run without ``generation()`` (the task card's API); every
        ``leak_window`` calls this closes a leak window. Do not mix with ``generation()``."""
        finding = self._slots.count_unrecorded(self._backend.sample().allocated_bytes)
        if finding is not None:
            self._report_leak(finding)

    def detect_memory_leak(self, threshold_mb: float | None = None) -> bool:
        """Compare allocated memory now with the open window's baseline (the task card's API).

        The first call only sets the baseline. Reports and returns True past the threshold.
        """
        threshold = self.leak_threshold_bytes if threshold_mb is None else int(threshold_mb * MB)
        finding = self._slots.check_against_baseline(self._backend.sample().allocated_bytes,
                                                     threshold)
        if finding is None:
            return False
        self._report_leak(finding)
        return True

    def leak_trend(self) -> LeakTrend:
        return self._slots.leak_trend()

    def _report_leak(self, f: LeakFinding, warn: bool = True) -> None:
        left = (
            "" if f.generations_to_hard_limit is None
            else f", ~{f.generations_to_hard_limit:.0f} generations left before the hard limit"
        )
        msg = (
            f"Potential VRAM leak: initial_usage={f.initial_bytes / GB:.2f}GB, "
            f"current_usage={f.current_bytes / GB:.2f}GB, delta=+{f.delta_bytes / GB:.2f}GB, "
            f"generations={f.generations} (trend {f.bytes_per_generation / MB:+.2f}MB/generation"
            f"{left})"
        )
        logger.warning(msg, extra={
            "vram_event": "leak_suspected", "initial_usage_gb": to_gb(f.initial_bytes),
            "current_usage_gb": to_gb(f.current_bytes), "delta_gb": to_gb(f.delta_bytes),
            "generations": f.generations, "bytes_per_generation": f.bytes_per_generation,
            "generations_to_hard_limit": f.generations_to_hard_limit, "device": self.device})
        if warn:
            warnings.warn(MemoryLeakWarning(msg), stacklevel=4)

    # ------------------------------------------------------------------ cleanup

    def emergency_cleanup(self) -> int:
        """``gc.collect()`` and ``empty_cache()`` now, whatever the cooldown; returns the
        reserved bytes freed (``empty_cache`` lowers reserved, never allocated)."""
        return self._cleaner.run("manual", respect_cooldown=False).freed_bytes

    def request_cleanup(self, reason: str = "http") -> CleanupResult:
        """A cleanup that obeys ``cleanup_cooldown_s``: raises ``CleanupCooldownError``
        within it. For callers outside the generation loop (the control plane)."""
        return self._cleaner.run(reason, respect_cooldown=True)

    def _try_auto_cleanup(self, reason: str) -> CleanupResult | None:
        try:
            return self._cleaner.run(reason, respect_cooldown=True)
        except CleanupCooldownError as exc:
            logger.debug("automatic cleanup skipped: %s", exc)
        except Exception as exc:  # the guard reports the pressure; a failed cleanup can't mask it
            self._backend_failed("emergency cleanup", exc)
        return None

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, event: str = "snapshot", slot: int | None = None) -> VRAMSnapshot:
        """A fresh, immutable view of the device and the monitor, not logged."""
        s = self._backend.sample()
        dm = self._backend.device_memory()
        with self._lock:
            models = {m.name: to_gb(m.vram_bytes) for m in self._models.values()}
            soft_v, hard_v = self._soft_violations, self._hard_violations
        generations, _, _, leaks = self._slots.counts()
        cleanups = self._cleaner.count
        t = self._slots.leak_trend()
        usage = s[self._basis]
        return VRAMSnapshot(
            timestamp=utc_timestamp(), event=event, slot=slot,
            vram_usage_gb=to_gb(usage), vram_allocated_gb=to_gb(s.allocated_bytes),
            vram_reserved_gb=to_gb(s.reserved_bytes), models=frozen_mapping(models),
            device=self.device, limit_basis=self.limit_basis, usage_bytes=usage,
            allocated_bytes=s.allocated_bytes, reserved_bytes=s.reserved_bytes,
            peak_allocated_bytes=s.peak_allocated_bytes,
            inactive_split_bytes=s.inactive_split_bytes,
            fragmentation_ratio=round(s.inactive_split_bytes / s.reserved_bytes, 4)
            if s.reserved_bytes else 0.0,
            device_free_bytes=dm.free_bytes, device_total_bytes=dm.total_bytes,
            non_torch_bytes=dm.non_torch_bytes, num_alloc_retries=s.num_alloc_retries,
            num_ooms=s.num_ooms, soft_limit_bytes=self.soft_limit_bytes,
            hard_limit_bytes=self.hard_limit_bytes, soft_limit_gb=to_gb(self.soft_limit_bytes),
            hard_limit_gb=to_gb(self.hard_limit_bytes), generation_count=generations,
            soft_limit_violations=soft_v, hard_limit_violations=hard_v,
            emergency_cleanups=cleanups, leak_warnings=leaks,
            leak_bytes_per_generation=round(t.bytes_per_generation, 1),
            leak_generations_to_hard_limit=None if t.generations_to_hard_limit is None
            else round(t.generations_to_hard_limit, 1),
        )

    def log_snapshot(self, event: str, slot: int | None = None) -> VRAMSnapshot:
        """Take a snapshot and log it as one JSON record (INFO, ``app.monitor.snapshots``)."""
        snap = self.snapshot(event, slot)
        snapshot_logger.info(snap.to_json(), extra={"vram_snapshot": snap.to_dict()})
        return snap

    def _log_periodic_snapshot(self, event: str, slot: int | None) -> None:
        # Per-slot snapshots would flood INFO at a few slots a second: INFO at most once per
        # snapshot_interval_s, DEBUG for every slot, and nothing built when neither is on.
        now = time.monotonic()
        with self._lock:
            due = self._last_info_snapshot is None or (
                now - self._last_info_snapshot >= self.snapshot_interval_s
            )
            if due and snapshot_logger.isEnabledFor(logging.INFO):
                self._last_info_snapshot = now
            else:
                due = False
        try:
            if due:
                self.log_snapshot(event, slot)
            elif snapshot_logger.isEnabledFor(logging.DEBUG):
                snap = self.snapshot(event, slot)
                snapshot_logger.debug(snap.to_json(), extra={"vram_snapshot": snap.to_dict()})
        except Exception as exc:
            self._backend_failed("snapshot", exc)

    # ------------------------------------------------------------------ backend failures

    def _safe_sample(self, where: str) -> AllocatorSample | None:
        try:
            return self._backend.sample()
        except Exception as exc:
            self._backend_failed(where, exc)
            return None

    def _post_mortem(self, tag: str) -> None:
        dump = getattr(self._backend, "dump_post_mortem", None)  # optional: CUDA only
        if dump is None:
            return
        try:
            path = dump(tag)
        except Exception as exc:
            logger.warning("could not write the OOM memory snapshot: %s: %s",
                           type(exc).__name__, exc)
            return
        if path is not None:
            logger.error("allocator history for the OOM written to %s "
                         "(open it in https://pytorch.org/memory_viz)", path)

    def _safe_reset_peak(self) -> None:
        try:
            self._backend.reset_peak()
        except Exception as exc:
            self._backend_failed("reset_peak", exc)

    def _backend_failed(self, where: str, exc: Exception) -> None:
        """Count every failure; log one per ERROR_LOG_INTERVAL_S so a dead backend cannot
        flood the log from a loop calling guards a thousand times a second."""
        now = time.monotonic()
        with self._lock:
            self._monitor_errors += 1
            errors = self._monitor_errors
            log = self._last_error_log is None or now - self._last_error_log >= ERROR_LOG_INTERVAL_S
            if log:
                self._last_error_log = now
        if log:
            logger.error("VRAM backend read failed in %s (%s: %s); guards fail open "
                         "(%d monitor errors so far)", where, type(exc).__name__, exc, errors)


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {why}")


def _budget_bytes(budget_gb: float | None) -> int | None:
    if budget_gb is None:
        return None
    if budget_gb <= 0:
        raise ValueError(f"budget_gb must be positive, got {budget_gb}")
    return int(budget_gb * GB)
