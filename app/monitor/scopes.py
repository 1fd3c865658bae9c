"""``generation()`` and ``stage()``: the scopes a Director runs its slots in.

They read the allocator at a scope's start and end, reset its peak register (the monitor
owns it: it is global per device) and hand the figures to the generation tracker; their
boundaries are where a cleanup another thread asked for runs (see cleanup.py). An OOM that
escapes a slot, or a model load (``escaped_oom``), becomes ``MemoryPressureError`` (oom.py).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.backends import AllocatorSample, MemoryBackend, OutOfMemoryError, is_oom_error
from app.errors import MemoryPressureError
from app.monitor.cleanup import CleanupRunner
from app.monitor.faults import BackendFaults
from app.monitor.generations import GenerationTracker
from app.monitor.oom import oom_error, where, write_post_mortem
from app.monitor.records import CleanupAttempt, GenerationRecord, LeakFinding
from app.monitor.snapshots import SnapshotBuilder

logger = logging.getLogger("app.monitor.monitor")


class Scopes:
    def __init__(self, backend: MemoryBackend, tracker: GenerationTracker,
                 cleanups: CleanupRunner, snapshots: SnapshotBuilder, faults: BackendFaults,
                 *, report_leak: Callable[[LeakFinding], None],
                 cleanup: Callable[[str, bool], CleanupAttempt]) -> None:
        self._backend = backend
        self._tracker = tracker
        self._cleanups = cleanups
        self._snapshots = snapshots
        self._faults = faults
        self._report_leak = report_leak
        self._cleanup = cleanup

    def sample(self, where_: str) -> AllocatorSample | None:
        try:
            return self._backend.sample()
        except Exception as exc:
            self._faults.failed(where_, exc)
            return None

    def reset_peak(self) -> None:
        try:
            self._backend.reset_peak()
        except Exception as exc:
            self._faults.failed("reset_peak", exc)

    @contextmanager
    def generation(self, slot: int | None, scale: float) -> Iterator[GenerationRecord]:
        """See ``VRAMMonitor.generation``."""
        # First of all, so that not even the slot's first read runs beside empty_cache: wait
        # for a cleanup begun between slots, and hold any other until this slot's boundaries.
        registered = self._cleanups.enter_generation(slot)
        try:
            oom_events = self._oom_events()
            before = self.sample("generation")
            before_bytes = before.allocated_bytes if before else None
            record = self._tracker.begin(slot, before_bytes or 0, scale)
        except BaseException:
            if registered:
                self._cleanups.leave_generation()
            raise
        self.reset_peak()
        self._snapshots.log_periodic("pre_generation", slot)
        t0 = time.perf_counter()
        try:
            yield record
        except BaseException as exc:
            if isinstance(exc, MemoryPressureError) and exc.reason == "oom":
                # A model loaded inside the slot did not fit: track_model_load said so and
                # cleaned up; the slot ran out of memory all the same.
                self._finish(record, before_bytes, t0, "oom", oom_events, visible=1)
                raise
            if not (isinstance(exc, Exception) and is_oom_error(exc)):
                self._finish(record, before_bytes, t0, "failed", oom_events)
                raise
            # Drop the frames' locals so the tensors the failed slot held can be freed.
            traceback.clear_frames(exc.__traceback__)
            oom = exc
        else:
            self._finish(record, before_bytes, t0, "ok", oom_events)
            return
        # an OOM from the caching allocator is one of its events; cuBLAS's or cuDNN's own is not
        self._finish(record, before_bytes, t0, "oom", oom_events,
                     visible=int(isinstance(oom, OutOfMemoryError)))
        raise self.escaped_oom(oom, "in " + where(slot, record.failed_stage),
                               f"slot{slot}") from oom

    def escaped_oom(self, oom: BaseException, place: str, tag: str) -> MemoryPressureError:
        """An OOM that escaped the guards ``place``, its frames already cleared (so what it
        held can die): logged, the post-mortem written (the history as the OOM saw it), the
        cache returned; the error to raise in its place."""
        logger.error("CUDA out of memory %s escaped the guards; cleaning up", place)
        write_post_mortem(self._backend, tag)
        return oom_error(oom, place, self._cleanup("oom", True))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """See ``VRAMMonitor.stage``."""
        if self._cleanups.pending is not None:
            self._cleanups.run_pending()
        self._tracker.open_stage(name, self._peak_now())
        self.reset_peak()
        failed, wanted = False, 0
        try:
            yield
        except BaseException as exc:
            failed = True
            wanted = getattr(exc, "projected_bytes", None) or 0  # a refused allocation's
            raise
        finally:
            self._tracker.close_stage(name, self._peak_now(), failed, wanted)
            if self._cleanups.pending is not None:
                self._cleanups.run_pending()

    def _peak_now(self) -> int:
        s = self.sample("stage")
        return s.peak_allocated_bytes if s else 0

    def _oom_events(self) -> int | None:
        """The allocator's OOMs so far, caught or not (None: the backend cannot tell)."""
        count = getattr(self._backend, "allocator_oom_events", None)
        try:
            return None if count is None else int(count())
        except Exception as exc:
            self._faults.failed("allocator_oom_events", exc)
            return None

    def _finish(self, record: GenerationRecord, before_bytes: int | None, t0: float,
                status: str, oom_events: int | None, visible: int = 0) -> None:
        try:
            after = self.sample("generation")
            now = self._oom_events() if oom_events is not None else None
            # What the allocator raised inside the slot, less the one that ended it (if it
            # did): OOMs a kernel caught and retried, not failures.
            absorbed = 0 if now is None else max(0, now - oom_events - visible)
            finding = self._tracker.finish(
                record, before_bytes,
                None if after is None else (after.allocated_bytes, after.peak_allocated_bytes),
                status, time.perf_counter() - t0, absorbed,
            )
            self._snapshots.log_periodic("post_generation", record.slot)
            if finding is not None:
                self._report_leak(finding)
        finally:
            # On every way out of the slot: what another thread asked for runs now.
            self._cleanups.leave_generation()
