"""The VRAM monitor: a façade over the parts that each own one job and one lock.

* ``LimitGuard`` (limits.py): the soft and hard limits, ``check_limits``, ``check_allocation``;
* ``AllocatorModel`` (placement.py): what a request, a slot or a cleanup would do;
* ``ModelRegistry`` (registry.py): resident models, budgets, ``validate_buffers``;
* ``GenerationTracker`` (generations.py): slots, peaks, history, histograms, liveness, the
  ``LeakDetector`` (leak.py) and the admission forecast; ``Admitter`` (admission.py) decides
  from it; ``Scopes`` (scopes.py) runs ``generation()``/``stage()``, with oom.py for an OOM;
* ``CleanupRunner`` (cleanup.py): cleanups, their clocks, and requests from other threads;
* ``SnapshotBuilder`` (snapshots.py): snapshots and their logging;
* ``BackendFaults`` (faults.py): failed reads, counted and logged at a bounded rate;
* ``MonitorViews`` (views.py): the read-only figures, this class's base.

Each part takes its lock briefly to copy or update its state and does the slow work
(formatting, logging, ``warnings.warn``, gc, ``empty_cache``) after releasing it. The façade
checks its options (app/options.py), wires the parts and keeps the public API. Its guards are
plain methods that forward to the limit guard: a subclass may override them, and the forward
costs one call frame (~0.1 us of the ~1 us a guard takes).
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from app.backends import MemoryBackend, default_backend, is_oom_error
from app.monitor.admission import Admitter, Forecaster
from app.monitor.cleanup import CleanupRunner
from app.monitor.faults import BackendFaults, RateLimit
from app.monitor.generations import GenerationTracker
from app.monitor.leak import report_leak
from app.monitor.limits import LimitGuard
from app.monitor.placement import LIMIT_BASES, AllocatorModel
from app.monitor.preflight import preflight
from app.monitor.records import (
    GB,
    MB,
    Admission,
    CleanupAttempt,
    CleanupResult,
    GenerationRecord,
    LeakFinding,
    PreflightResult,
    VRAMSnapshot,
)
from app.monitor.registry import ModelRegistry, budget_bytes
from app.monitor.scopes import Scopes
from app.monitor.snapshots import SnapshotBuilder
from app.monitor.views import MonitorViews
from app.options import check_options, number
from app.units import fmt_gb

if TYPE_CHECKING:
    from app.backends.capture import AllocationTrace
    from app.backends.rehearsal import Plan, Rehearsal
    from app.config import Settings
    from app.monitor.presets import SlotPreset

logger = logging.getLogger(__name__)


class VRAMMonitor(MonitorViews):
    """Watches one device against a soft and a hard limit.

    ``limit_basis`` picks the figure the limits apply to: ``"allocated"`` (the task card's
    default: bytes in live tensors) or ``"reserved"`` (what the process really holds from the
    device, cache included; only there can an emptied cache bring usage back down).

    ``python_warnings=False`` keeps the log lines and drops the ``MemoryPressureWarning`` /
    ``MemoryLeakWarning`` copies of them; either way a warning never raises into the loop.
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
        cleanup_wait_s: float = 10.0,
        soft_limit_hysteresis_mb: float = 100.0,
        snapshot_interval_s: float = 60.0,
        stall_after_s: float = 300.0,
        required_gb: float = 11.8,
        python_warnings: bool = True,
        admission_window: int = 100,
        admission_quantile: float = 0.9,
        admission_margin: float = 0.05,
        not_producing_after: int = 20,
    ) -> None:
        o = check_options(
            soft_limit_gb=soft_limit_gb, hard_limit_gb=hard_limit_gb,
            emergency_cleanup=emergency_cleanup, limit_basis=limit_basis,
            leak_threshold_mb=leak_threshold_mb, leak_window=leak_window,
            cleanup_cooldown_s=cleanup_cooldown_s, cleanup_wait_s=cleanup_wait_s,
            soft_limit_hysteresis_mb=soft_limit_hysteresis_mb,
            snapshot_interval_s=snapshot_interval_s, stall_after_s=stall_after_s,
            required_gb=required_gb, python_warnings=python_warnings,
            admission_window=admission_window, admission_quantile=admission_quantile,
            admission_margin=admission_margin, not_producing_after=not_producing_after)
        self.options = o
        # The checked options, by the names callers have always read them by.
        self.soft_limit_bytes, self.hard_limit_bytes = o.soft_limit_bytes, o.hard_limit_bytes
        self.leak_threshold_bytes, self.leak_window = o.leak_threshold_bytes, o.leak_window
        self.admission_window, self.admission_quantile = o.admission_window, o.admission_quantile
        self.admission_margin, self.required_bytes = o.admission_margin, o.required_bytes
        self.cleanup_cooldown_s, self.cleanup_wait_s = o.cleanup_cooldown_s, o.cleanup_wait_s
        self.snapshot_interval_s, self.stall_after_s = o.snapshot_interval_s, o.stall_after_s
        self.emergency_cleanup_enabled, self.limit_basis = o.emergency_cleanup, o.limit_basis
        self.python_warnings = o.python_warnings
        self.not_producing_after = o.not_producing_after

        self._backend: MemoryBackend = backend if backend is not None else default_backend()
        self._faults = BackendFaults()
        self._cleanups = CleanupRunner(self._backend, self.cleanup_cooldown_s,
                                       self.cleanup_wait_s)
        self._limits = LimitGuard(
            self._backend, basis=limit_basis, soft_limit_bytes=self.soft_limit_bytes,
            hard_limit_bytes=self.hard_limit_bytes,
            rearm_bytes=self.soft_limit_bytes - o.hysteresis_bytes,
            cleanup=self._auto_cleanup if self.emergency_cleanup_enabled else None,
            pending_cleanups=self._cleanups, faults=self._faults,
            python_warnings=self.python_warnings,
        )
        self._model = AllocatorModel(self._backend, limit_basis, self.hard_limit_bytes)
        self._basis_index = LIMIT_BASES.index(limit_basis)
        self._registry = ModelRegistry(self._backend)
        self._tracker = GenerationTracker(o.leak_window, self.leak_threshold_bytes,
                                        self.hard_limit_bytes,
                                        Forecaster(o.admission_window, o.admission_quantile,
                                                   o.admission_margin))
        self._snapshots = SnapshotBuilder(
            self._backend, self._limits, self._model, self._registry, self._tracker,
            self._cleanups, self._faults, basis=limit_basis,
            interval_s=self.snapshot_interval_s, stall_after_s=self.stall_after_s)
        self._scopes = Scopes(self._backend, self._tracker, self._cleanups, self._snapshots,
                              self._faults, report_leak=self._report_leak,
                              cleanup=self._auto_cleanup)
        self._admitter = Admitter(self._backend, self._model, self._tracker, self._faults,
                                  self._auto_cleanup, basis_index=self._basis_index,
                                  cleanup_enabled=self.emergency_cleanup_enabled)
        self._preflight: PreflightResult | None = None
        self._skip_log = RateLimit(60.0)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, backend: MemoryBackend | None = None
    ) -> VRAMMonitor:
        """A monitor with ``settings``' limits, on ``backend`` or the one the settings name
        (``VORTEX_BACKEND``, ``VORTEX_DEVICE``, ``VORTEX_MEMORY_HISTORY*``)."""
        if backend is None:
            backend = default_backend(settings)
        return cls(backend=backend, **settings.monitor_kwargs())

    # ------------------------------------------------------------------ guards (hot path)

    def check_limits(self, context: str = "") -> int | None:
        """Compare usage with the limits; returns the usage in bytes.

        Above the soft limit: one WARNING log, one count and one ``MemoryPressureWarning``
        per excursion (re-armed once usage falls below the soft limit minus the hysteresis),
        and an emergency cleanup when enabled, its clock allows and the cache holds something
        to return. Above the hard limit: an ERROR log and ``MemoryPressureError`` on every
        call, with a cleanup only where it frees something; on the reserved basis a cleanup
        that returns enough clears the error (such a recovery always runs).

        Fails open: if the backend cannot be read, the check counts a backend error, logs
        (rate-limited) and returns ``None``; the slot goes on, and an OOM it then meets is
        still caught by ``generation()``. Also the generation thread's boundary where a
        cleanup requested from another thread runs.
        """
        return self._limits.check(context)

    def check_allocation(self, requested_bytes: int, context: str = "") -> int | None:
        """Refuse, before it happens, an allocation that would take usage past the hard limit
        or that the allocator could not place (fragmentation): ``MemoryPressureError``
        (``reason="allocation_refused"``, ``projected_bytes``); nothing is allocated.

        Returns the projected usage in bytes, from the allocator model (placement.py): on
        the reserved basis a request that reuses a cached block adds nothing and a new
        segment adds its size, and a request that fits once the cache is released is not
        refused: the cache is released first. ``requested_bytes`` is a whole number of bytes:
        an integral number of any type (``int``, ``numpy.int64``, ...) or a whole float
        (``ValueError``/``TypeError`` otherwise, a bool included). Fails open like
        ``check_limits`` (returns ``None``) when the backend cannot be read.
        """
        return self._limits.check_allocation(requested_bytes, context)

    def fit_allocation(self, requested_bytes: int, context: str = "", *,
                       min_fraction: float = 0.5) -> int:
        """``check_allocation`` that shrinks instead of refusing: returns the bytes the caller
        may allocate: ``requested_bytes`` when they fit, else the most that fits under the hard
        limit, if that is at least ``min_fraction`` of the request; else raises
        ``MemoryPressureError`` as ``check_allocation`` would. A caller that can scale the
        work (fewer frames, a lower resolution) keeps the slot, degraded, instead of losing
        it; the running generation's outcome becomes ``degraded``, and the forecast learns
        the size it wanted. Costs what ``check_allocation`` costs when the request fits.
        ``min_fraction`` outside [0, 1] is a ``ValueError`` naming it.
        """
        fraction = _share("min_fraction", min_fraction, zero=True)
        nbytes, wanted = self._limits.fit(requested_bytes, context, fraction)
        if wanted:
            self._tracker.note_fitted(wanted)
        return nbytes

    # ------------------------------------------------------------------ pre-flight

    def preflight(self, required_gb: float | None = None) -> PreflightResult:
        """Check the card before any model loads: ``VortexInitializationError`` with the task
        card's message when less than ``required_gb`` (default ``required_gb`` of the
        settings) is available to this process, or when the hard limit exceeds the card."""
        required = self.required_bytes if required_gb is None else int(
            _number("required_gb", required_gb, above=0) * GB)
        self._preflight = preflight(self._backend, required, self.hard_limit_bytes)
        return self._preflight

    # ------------------------------------------------------------------ model registry

    @contextmanager
    def track_model_load(self, name: str, budget_gb: float | None = None, *,
                         replace: bool = False) -> Iterator[None]:
        """Register ``name`` with the allocated bytes its loading adds.

        Load one model at a time inside it: anything else allocated meanwhile counts too.
        Nothing is registered if loading raises. A load that runs out of memory
        (``torch.OutOfMemoryError``, or a cuBLAS/cuDNN allocation failure) raises
        ``MemoryPressureError`` (``reason="oom"``) naming the model and its budget, once what
        it placed is dropped and an emergency cleanup has returned the cache; inside a
        generation that slot counts as out of memory. A name already registered is refused
        (``ValueError``) unless ``replace``. A model loaded once generations have run moves
        the automatic leak baselines by what it added: a deliberate load is not a leak, whether
        it happens between slots or lazily inside one.
        """
        try:
            with self._registry.track_load(name, budget_gb, replace=replace,
                                           read=self._allocated_now) as added:
                yield
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            # Drop the frames' locals so the tensors the failed load made can be freed.
            traceback.clear_frames(exc.__traceback__)
            budget = budget_bytes(budget_gb)
            place = f"loading model {name}" + (
                "" if budget is None else f" (budget {fmt_gb(budget)})")
            raise self._scopes.escaped_oom(exc, place, f"load-{name}") from exc
        self._tracker.rebase_leak(added[0])

    def _allocated_now(self) -> int | None:
        s = self._scopes.sample("track_model_load")
        return None if s is None else s.allocated_bytes

    def register_model(self, name: str, module: torch.nn.Module, budget_gb: float | None = None,
                       *, replace: bool = False) -> int:
        """Register an already-loaded module by the unique storages it holds on this device;
        returns those bytes. A name already registered is refused unless ``replace``."""
        return self._registry.register_module(name, module, budget_gb, replace=replace)

    def unregister_model(self, name: str) -> None:
        """Forget ``name``; the leak baselines move down by what it held, since the caller
        frees it (a LoRA swap is an unload and a load, and neither is a leak)."""
        record = self._registry.remove(name)
        if record is not None:
            self._tracker.rebase_leak(-record.vram_bytes)

    def models_over_budget(self) -> list[str]:
        """The names of the models past their budget (beyond allocator rounding)."""
        return [m.name for m in self._registry.models() if m.over_budget]

    def validate_buffers(self, buffers: Mapping[str, int]) -> int:
        """Check that output buffers fit under the hard limit next to what is resident.

        Resident is the larger of current usage and the registered models' sum, so the
        check also works before the models are loaded. Returns the headroom left after the
        buffers, in bytes; raises ``MemoryPressureError`` naming each buffer that does not fit.
        """
        return self._registry.validate_buffers(buffers, self.usage_bytes(),
                                               self.hard_limit_bytes)

    # ------------------------------------------------------------------ generations

    def generation(self, slot: int | None = None, *,
                   scale: float = 1.0) -> AbstractContextManager[GenerationRecord]:
        """Measure one slot: delta (allocated after - before) and peak, counted for leaks.

        ``scale`` is the share of its full-size activations the slot runs at (a degraded slot,
        after a refusing ``admit()``): the forecast counts its activations at full size, and
        its outcome is ``degraded`` rather than ``full``.

        The allocator's peak register is global per device, so the monitor owns its resets:
        it resets it here and in ``stage()`` and folds what it read before each reset into
        the figures; nothing else in the process should call ``reset_peak_memory_stats``
        while a generation runs. One generation at a time per monitor. A slot that starts
        while a cleanup begun between slots runs waits for it, up to ``cleanup_wait_s``, before
        its first read. An OOM escaping the slot (``torch.OutOfMemoryError``, or a
        cuBLAS/cuDNN allocation failure) becomes a ``MemoryPressureError`` naming the slot and
        stage, after an emergency cleanup.
        ``scale`` outside (0, 1] is a ``ValueError`` naming it.
        """
        scale = _share("scale", scale, zero=False)
        return self._scopes.generation(slot, scale)

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Measure the peak of one stage (one model's forward, say) inside a generation.
        Its start and end are boundaries where a requested cleanup runs."""
        return self._scopes.stage(name)

    # ------------------------------------------------------------------ admission

    def admit(self, slot: int | None = None, *,
              presets: Sequence[SlotPreset] | None = None) -> Admission:
        """Decide, before ``slot`` starts, whether it fits under the hard limit, and at which
        size. See ``docs/admission.md``.

        With ``presets`` (the slot at each size a Director can run it, the largest first at
        scale 1.0, each stage with its traced forward: ``SlotPreset``/``StagePlan``), by
        rehearsal: each preset from the largest down is replayed on a copy of the allocator
        as it is (``rehearse``), and the first that fits is taken: ``admit`` (or ``cleanup``)
        when the slot as asked fits, ``refuse`` with ``activation_scale`` the chosen preset's
        scale when only a smaller one does, and 0.0 when none does. A stage without a trace
        is judged by its forecast at the preset's scale. Milliseconds: once per slot.

        Without, by forecast: a high quantile of the last slots' activation peaks (above the
        level each started from) plus a margin, from one allocator read: ``admit`` when the
        forecast peak fits; ``cleanup`` when it fits only once the allocator cache is
        released (on the reserved basis), released before this returns; ``refuse``
        otherwise, with ``activation_scale`` the share of the forecast activation that fits.
        With no history yet it admits, with the forecast peak at current usage.

        Fails open: an unreadable backend admits (a failed rehearsal falls back to the
        forecast). Malformed ``presets`` are a ``TypeError``/``ValueError`` naming them.
        """
        return self._admitter.admit(slot, presets)

    def rehearse(self, trace: AllocationTrace | Plan) -> Rehearsal:
        """What ``trace`` (or a slot's plan: (trace, repeats) pairs, each repeat a run of the
        trace whose leftovers are freed at its end) would do on the card as it is now,
        against this monitor's hard limit on its limit basis: replayed on a copy of the
        allocator (a twin built from a snapshot on CUDA), leaving the card as it was.
        ``fits``, the peaks, the first OOM and the first event past the hard limit (indices in
        the plan's events, repeats counted): exactly what running it would show, save where
        a snapshot cannot say (app/backends/twin.py: the twin errs towards "does not fit").
        Not for a guard's hot path: milliseconds, once per slot."""
        return self._backend.rehearse(trace, hard_limit_bytes=self.hard_limit_bytes,
                                      basis=self.limit_basis)

    def skip_slot(self, slot: int | None = None, reason: str = "") -> None:
        """Count a slot the Director skipped before any stage ran (outcome ``skipped``).
        Logged once, then at most once a minute with the count since (a Director whose every
        slot is skipped would otherwise log each one, forever)."""
        self._tracker.skip()
        due, since = self._skip_log.tick()
        if due:
            more = f" ({since} more since the last such line)" if since else ""
            logger.warning("slot %s skipped before it started%s%s", slot,
                           f": {reason}" if reason else "", more,
                           extra={"vram_event": "slot_skipped", "slot": slot,
                                  "skipped_since_last_line": since, "device": self.device})

    # ------------------------------------------------------------------ the card's leak API

    def increment_generation_count(self) -> None:
        """Count a generation run without ``generation()`` (the task card's API); every
        ``leak_window`` calls this closes a leak window. Do not mix with ``generation()``.
        Fails open: a failed read counts the generation without measuring it."""
        s = self._scopes.sample("increment_generation_count")
        finding = self._tracker.count_unrecorded(None if s is None else s.allocated_bytes)
        if finding is not None:
            self._report_leak(finding)

    def detect_memory_leak(self, threshold_mb: float | None = None) -> bool:
        """The task card's check: allocated memory now against a baseline set on the first
        call and never moved (the level before the first generation when generations ran
        before that call). Reports and returns True past the threshold; the first call that
        sets the baseline returns False. Separate from the automatic detection, which keeps
        baselines of its own. Fails open: False when the backend cannot be read."""
        threshold = self.leak_threshold_bytes if threshold_mb is None else int(
            _number("threshold_mb", threshold_mb, above=0) * MB)
        s = self._scopes.sample("detect_memory_leak")
        if s is None:
            return False
        now = s.allocated_bytes
        baseline, just_set = self._tracker.card_leak_baseline(now)
        if just_set or now - baseline <= threshold:
            return False
        t = self._tracker.leak_trend()
        self._report_leak(LeakFinding(baseline, now, self.generation_count,
                                      self.generation_count, t.bytes_per_generation,
                                      t.generations_to_hard_limit), count=False)
        return True

    def _report_leak(self, f: LeakFinding, *, count: bool = True) -> None:
        report_leak(f, device=self.device, python_warnings=self.python_warnings, count=count)

    # ------------------------------------------------------------------ cleanup

    def emergency_cleanup(self) -> int:
        """``gc.collect()`` and ``empty_cache()`` now, on the calling thread, whatever the
        cooldown; returns the reserved bytes freed (``empty_cache`` lowers reserved, never
        allocated). Raises the backend's error if it fails."""
        return self._cleanups.run("manual", cooldown=False).freed_bytes

    def request_cleanup(self, reason: str = "http", wait_s: float | None = None,
                        stop: threading.Event | None = None) -> CleanupResult | None:
        """A cleanup for callers outside the generation loop (the control plane).

        Obeys its clock (``CleanupCooldownError`` within ``cleanup_cooldown_s`` of the last
        discretionary cleanup). While a generation runs on another thread it is carried out
        by that thread at its next boundary; this waits up to ``wait_s`` (default
        ``cleanup_wait_s``) and returns ``None`` if it is still scheduled then. Without a
        generation running, or from the generation thread, it runs at once.
        """
        wait = self.cleanup_wait_s if wait_s is None else wait_s
        return self._cleanups.request(reason, wait, stop)

    def _auto_cleanup(self, reason: str, recovery: bool) -> CleanupAttempt:
        """A cleanup the monitor decided on; a recovery ignores the clock. Never raises: the
        guard reports the pressure, and a failed cleanup must not mask it. Nothing runs with
        ``emergency_cleanup`` off, nor in the very state a cleanup already freed nothing in."""
        if not self.emergency_cleanup_enabled:
            return CleanupAttempt("disabled")
        return self._cleanups.automatic(reason, recovery=recovery)

    # ------------------------------------------------------------------ snapshots

    def log_snapshot(self, event: str, slot: int | None = None) -> VRAMSnapshot:
        """Take a snapshot and log it as one JSON record (INFO, ``app.monitor.snapshots``)."""
        return self._snapshots.log(event, slot)

    def allocator_snapshot(self) -> dict[str, Any]:
        """The allocator's own snapshot in PyTorch's format (``segments`` with their
        ``blocks``, ``device_traces``, ``allocator_settings``), which
        ``torch.cuda._memory_viz`` and https://pytorch.org/memory_viz read: what pins the
        memory. Costly (it walks every block): not for the hot path. ``TypeError`` when the
        backend has no snapshot to give."""
        take = getattr(self._backend, "memory_snapshot", None)
        if take is None:
            raise TypeError(f"{type(self._backend).__name__} gives no allocator snapshot")
        return take()


def _share(name: str, value: Any, *, zero: bool) -> float:
    """A share of a whole, in [0, 1] (``zero``) or (0, 1], as a float; else a plain
    ``ValueError`` naming the argument, whatever is wrong with it (type, NaN, range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= value <= 1 if zero else 0 < value <= 1):
        raise ValueError(f"{name}={value!r} must be in {'[0, 1]' if zero else '(0, 1]'}")
    return float(value)


def _number(name: str, value: Any, *, above: float | None = None,
            at_least: float | None = None) -> float:
    """``value`` as a finite float, or a ``ValueError`` that names the argument."""
    return number(name, value, above=above, at_least=at_least, at_most=math.inf)
