"""Snapshots: an immutable view of the device and the monitor, built and logged here."""

from __future__ import annotations

import logging
import threading
import time

from app.backends import MemoryBackend
from app.backends.base import NO_TELEMETRY
from app.monitor.cleanup import CleanupRunner
from app.monitor.faults import BackendFaults
from app.monitor.generations import GenerationTracker
from app.monitor.limits import LimitGuard
from app.monitor.placement import AllocatorModel
from app.monitor.records import VRAMSnapshot, frozen_mapping, to_gb, utc_timestamp
from app.monitor.registry import ModelRegistry

snapshot_logger = logging.getLogger("app.monitor.snapshots")


class SnapshotBuilder:
    """Reads the other parts (each under its own lock, one after another) into a snapshot;
    owns only the clock of the periodic INFO snapshot."""

    def __init__(
        self,
        backend: MemoryBackend,
        limits: LimitGuard,
        model: AllocatorModel,
        registry: ModelRegistry,
        slots: GenerationTracker,
        cleaner: CleanupRunner,
        faults: BackendFaults,
        *,
        basis: str,
        interval_s: float,
        stall_after_s: float,
    ) -> None:
        self._backend = backend
        self._limits = limits
        self._model = model
        self._registry = registry
        self._slots = slots
        self._cleaner = cleaner
        self._faults = faults
        self._basis = basis
        self._basis_index = 0 if basis == "allocated" else 1
        self.interval_s = interval_s
        self.stall_after_s = stall_after_s
        self._lock = threading.Lock()
        self._last_info: float | None = None  # monotonic
        self._last_slot: tuple[int, int | None] = (0, None)  # (generations, its last slot)

    def build(self, event: str = "snapshot", slot: int | None = None) -> VRAMSnapshot:
        """One allocator read; the device figures come from the same read. Raises when the
        backend cannot be read (the HTTP side answers 503)."""
        b = self._backend
        s = b.sample()
        dm = b.device_memory(s)
        models = {m.name: to_gb(m.vram_bytes) for m in self._registry.models()}
        slots = self._slots.summary(self.stall_after_s)
        t, live, f = slots.trend, slots.liveness, slots.forecast
        cleanups, _, cleanup_failures = self._cleaner.totals()
        usage = s[self._basis_index]
        hard = self._limits.hard_limit_bytes
        frag = self._model.fragmentation(s, b.cache_view())
        forecast_peak = self._model.slot(s, f.activation_bytes, cleanup_allowed=False).peak_bytes \
            if f.samples else usage
        telemetry = b.device_telemetry() if hasattr(b, "device_telemetry") else NO_TELEMETRY
        return VRAMSnapshot(
            timestamp=utc_timestamp(), event=event, slot=slot,
            vram_usage_gb=to_gb(usage), vram_allocated_gb=to_gb(s.allocated_bytes),
            vram_reserved_gb=to_gb(s.reserved_bytes), models=frozen_mapping(models),
            device=b.device, device_name=b.name, device_uuid=b.uuid,
            limit_basis=self._basis, usage_bytes=usage,
            allocated_bytes=s.allocated_bytes, reserved_bytes=s.reserved_bytes,
            stage_peak_allocated_bytes=s.peak_allocated_bytes,
            inactive_split_bytes=s.inactive_split_bytes,
            fragmentation_ratio=frag.ratio,
            fragmentation=frozen_mapping(frag._asdict()),
            allocator_settings=frozen_mapping(b.allocator_settings.to_dict()),
            device_free_bytes=dm.free_bytes, device_total_bytes=dm.total_bytes,
            non_torch_bytes=dm.non_torch_bytes, num_alloc_retries=s.num_alloc_retries,
            num_ooms=s.num_ooms, soft_limit_bytes=self._limits.soft_limit_bytes,
            hard_limit_bytes=self._limits.hard_limit_bytes,
            soft_limit_gb=to_gb(self._limits.soft_limit_bytes),
            hard_limit_gb=to_gb(self._limits.hard_limit_bytes), generation_count=slots.generations,
            soft_limit_violations=self._limits.soft_violations,
            hard_limit_violations=self._limits.hard_violations,
            emergency_cleanups=cleanups, leak_warnings=slots.leak_warnings,
            leak_bytes_per_generation=round(t.bytes_per_generation, 1),
            leak_generations_to_hard_limit=None if t.generations_to_hard_limit is None
            else round(t.generations_to_hard_limit, 1),
            post_generation_allocated_bytes=live.post_generation_allocated_bytes,
            generations_failed=slots.failed, ooms_caught=slots.ooms,
            generations_peak_over_hard_limit=slots.peaks_over_hard_limit,
            ooms_absorbed=slots.ooms_absorbed,
            backend_errors=self._faults.count, cleanup_failures=cleanup_failures,
            slot_outcomes=slots.outcomes, admissions=slots.admissions, running_slot=live.slot,
            running_s=round(live.running_s, 3), stalled=live.stalled,
            lost_slots_in_a_row=live.lost_in_a_row,
            last_generation_at=None if live.last_generation_at is None
            else utc_timestamp(live.last_generation_at),
            last_cleanup=self._cleaner.last(), forecast_samples=f.samples,
            forecast_activation_bytes=f.activation_bytes, forecast_peak_bytes=forecast_peak,
            forecast_headroom_bytes=hard - forecast_peak,
            last_slot=self._last_slot_of(slots.generations),
            gpu_utilization_percent=telemetry.utilization_percent,
            gpu_temperature_celsius=telemetry.temperature_celsius,
            gpu_power_watts=telemetry.power_watts,
            gpu_power_limit_watts=telemetry.power_limit_watts,
        )

    def _last_slot_of(self, generations: int) -> int | None:
        """The last record's slot, read again only when generations ended since."""
        with self._lock:
            counted, slot = self._last_slot
        if counted != generations:
            recent = self._slots.recent()
            slot = recent[-1].slot if recent else None
            with self._lock:
                self._last_slot = (generations, slot)
        return slot

    def log(self, event: str, slot: int | None = None) -> VRAMSnapshot:
        """Build a snapshot and log it as one JSON record (INFO, ``app.monitor.snapshots``)."""
        snap = self.build(event, slot)
        snapshot_logger.info(snap.to_json(), extra={"vram_snapshot": snap.to_dict()})
        return snap

    def log_periodic(self, event: str, slot: int | None) -> None:
        """From the generation loop. Per-slot snapshots would flood INFO at a few slots a
        second: INFO at most once per ``interval_s``, DEBUG for every slot, nothing built
        when neither is on. Never raises."""
        now = time.monotonic()
        with self._lock:
            due = self._last_info is None or now - self._last_info >= self.interval_s
            if due and snapshot_logger.isEnabledFor(logging.INFO):
                self._last_info = now
            else:
                due = False
        try:
            if due:
                self.log(event, slot)
            elif snapshot_logger.isEnabledFor(logging.DEBUG):
                snap = self.build(event, slot)
                snapshot_logger.debug(snap.to_json(), extra={"vram_snapshot": snap.to_dict()})
        except Exception as exc:
            self._faults.failed("snapshot", exc)
