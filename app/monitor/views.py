"""What the monitor shows: its read-only figures, apart from what it does.

``MonitorViews`` is ``VRAMMonitor``'s base: each read forwards to the part that owns the
figure (the limit guard, the tracker, the cleanup runner, the registry, the snapshot builder),
which copies it under its own lock. It holds no state; the façade sets the parts up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.monitor.records import (
    CleanupResult,
    Forecast,
    GenerationRecord,
    Histograms,
    LeakTrend,
    Liveness,
    ModelRecord,
    MonitorCounters,
    ReadinessState,
    VRAMSnapshot,
    to_gb,
)

if TYPE_CHECKING:
    from app.backends import MemoryBackend
    from app.monitor.cleanup import CleanupRunner
    from app.monitor.faults import BackendFaults
    from app.monitor.generations import GenerationTracker
    from app.monitor.limits import LimitGuard
    from app.monitor.records import PreflightResult
    from app.monitor.registry import ModelRegistry
    from app.monitor.snapshots import SnapshotBuilder


class MonitorViews:
    # Set by VRAMMonitor.__init__.
    _backend: MemoryBackend
    _limits: LimitGuard
    _tracker: GenerationTracker
    _cleanups: CleanupRunner
    _registry: ModelRegistry
    _snapshots: SnapshotBuilder
    _faults: BackendFaults
    _preflight: PreflightResult | None
    limit_basis: str
    stall_after_s: float
    not_producing_after: int

    @property
    def backend(self) -> MemoryBackend:
        """The backend the monitor reads (``SimulatedBackend``, ``CudaBackend``, ...)."""
        return self._backend

    @property
    def device(self) -> str:
        """The backend's label (``cuda:0``, ``sim:0``): the metrics' ``device`` label."""
        return self._backend.device

    @property
    def soft_limit_violations(self) -> int:
        """Soft-limit excursions so far (each counted once, at its edge)."""
        return self._limits.soft_violations

    @property
    def hard_limit_violations(self) -> int:
        """Hard-limit violations so far: checks above it and allocations refused."""
        return self._limits.hard_violations

    @property
    def emergency_cleanups(self) -> int:
        """Cleanups run so far, every reason."""
        return self._cleanups.count

    @property
    def generation_count(self) -> int:
        """Generations counted so far (``generation()`` and ``increment_generation_count``)."""
        return self._tracker.generations

    @property
    def preflight_passed(self) -> bool:
        """Whether ``preflight()`` has passed."""
        return self._preflight is not None

    def usage_bytes(self) -> int:
        """The figure the limits apply to, read now."""
        return self._backend.sample()[0 if self.limit_basis == "allocated" else 1]

    def counters(self) -> MonitorCounters:
        """Every counter at one moment: violations, cleanups, generations, OOMs, leaks, faults."""
        generations, failed, ooms, leaks, over_hard, absorbed = self._tracker.counts()
        cleanups, freed, cleanup_failures = self._cleanups.totals()
        return MonitorCounters(
            self._limits.soft_violations, self._limits.hard_violations, cleanups, freed,
            generations, failed, ooms, leaks, self._faults.count, cleanup_failures, over_hard,
            absorbed)

    def cleanups_by_reason(self) -> tuple[dict[str, int], dict[str, int]]:
        """(cleanups run, cleanups failed), each by reason."""
        return self._cleanups.by_reason()

    def histograms(self) -> Histograms:
        """Peak, activation peak and delta bytes of the generations so far."""
        return Histograms(*self._tracker.histograms())

    def recent_generations(self) -> list[GenerationRecord]:
        """The last generations' records, oldest first."""
        return self._tracker.recent()

    def last_cleanup(self) -> CleanupResult | None:
        """The last cleanup that ran, whatever its reason; None before one."""
        return self._cleanups.last()

    def cleanup_retry_after(self, reason: str = "http") -> float:
        """Seconds until a cleanup for ``reason`` may run again; 0 when it may run now."""
        return self._cleanups.retry_after(reason)

    def liveness(self) -> Liveness:
        """The running slot and for how long; ``stalled`` once it passed ``stall_after_s``.
        A Director idle between slots is not stalled."""
        return self._tracker.liveness(self.stall_after_s)

    def forecast(self) -> Forecast:
        """The current forecast of the next slot's activations (nominal, margin included)."""
        return self._tracker.forecast()

    def slot_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(slot outcomes: full, degraded, skipped, aborted; admission decisions)."""
        return self._tracker.slot_counts()

    def leak_trend(self) -> LeakTrend:
        """The slope of the post-generation level over the last window, and the generations
        left before the hard limit at that rate."""
        return self._tracker.leak_trend()

    def models(self) -> list[ModelRecord]:
        """The resident models, as registered."""
        return self._registry.models()

    def get_vram_breakdown(self) -> dict[str, float]:
        """Per-model resident memory in GB."""
        return {m.name: to_gb(m.vram_bytes) for m in self._registry.models()}

    def memory_summary(self) -> str:
        """``torch.cuda.memory_summary()``'s text for the backend's device (on the simulated
        card the same table over its ``memory_stats()``); raises when it cannot be read."""
        return self._backend.memory_summary()

    def snapshot(self, event: str = "snapshot", slot: int | None = None) -> VRAMSnapshot:
        """A fresh, immutable view of the device and the monitor, not logged."""
        return self._snapshots.build(event, slot)

    def readiness(self, *, shutting_down: bool = False) -> ReadinessState:
        """Whether this Director should be sent work: pre-flight passed and models registered,
        no slot stalled, slots being produced (fewer than ``not_producing_after`` lost in a
        row), and not shutting down. What ``/readyz`` and ``icn_vortex_vram_ready`` say."""
        live = self.liveness()
        if shutting_down:
            return ReadinessState(False, "shutting_down", "the Director is stopping: it "
                                  "finishes the running slot and takes no new work")
        if not self._preflight or not self._registry.models():
            return ReadinessState(False, "not_started", "pre-flight has not passed or no "
                                  "model is registered yet")
        if live.stalled:
            return ReadinessState(False, "stalled", f"generation loop stalled: slot "
                                  f"{live.slot} has run {live.running_s:.0f}s "
                                  f"(stall_after_s={self.stall_after_s:g})")
        if live.lost_in_a_row >= self.not_producing_after:
            return ReadinessState(False, "not_producing", f"producing nothing: the last "
                                  f"{live.lost_in_a_row} slots were skipped or aborted "
                                  f"(not_producing_after={self.not_producing_after})")
        return ReadinessState(True, None, None)
