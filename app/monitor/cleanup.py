"""Emergency cleanup (gc + empty_cache): who may run one when, and on which thread.

**Clocks.** On an H200, a thread calling ``empty_cache`` in a loop made another thread's
allocation loop 9x slower, so cleanups that are merely useful are spaced by ``cooldown_s``.
Each kind has a clock of its own, so one kind never blocks another:

* ``soft_limit`` and ``http`` share the *discretionary* clock: both release cache that nothing
  is waiting for, and an operator's cleanup right after an automatic one would free nothing;
  but an automatic one that freed nothing gives the clock back, so it never blocks the
  operator's request;
* ``hard_limit`` has its own clock, which binds only the cleanups that cannot change the
  outcome (on the ``allocated`` basis, or when the cache is too small): a cleanup that can
  bring usage back under the hard limit is a recovery and always runs (``cooldown=False``);
* ``oom``, ``admission`` and ``manual`` (a direct call in code) always run.

A cleanup that fails does not claim its clock: a healthy retry may run at once.

**Threads.** On CUDA, ``empty_cache`` frees cached blocks on every device with ``cudaFree``,
which synchronises the device, and holds the allocator's mutex meanwhile; ``gc.collect``
stalls every Python thread. Run from the HTTP thread in the middle of a slot, it would stall
the slot's kernels and allocations at a moment nobody chose. So while a generation runs, a
requested cleanup is only *registered*; the generation thread carries it out at its next
boundary (a guard call, a stage's start or end, the slot's end), where the slot's own work is
between two steps anyway. With no generation running, or when asked from the generation
thread itself, it runs at once; a slot that starts meanwhile waits for it (up to ``wait_s``)
before its first read, and from that first line on no cleanup starts beside it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from app.backends import AllocatorSample, MemoryBackend
from app.errors import CleanupCooldownError
from app.monitor.records import MB, CleanupAttempt, CleanupResult, to_gb, utc_timestamp
from app.units import fmt_gb, gb_figures

logger = logging.getLogger(__name__)

_CLOCKS = {"soft_limit": "discretionary", "http": "discretionary", "hard_limit": "hard_limit"}
FAILURE_LOG_INTERVAL_S = 10.0


@dataclass(eq=False)
class PendingCleanup:
    """A cleanup registered for the generation thread; every requester waits on ``done``."""

    reason: str
    done: threading.Event = field(default_factory=threading.Event)
    result: CleanupResult | None = None
    error: Exception | None = None


class CleanupRunner:
    """Runs cleanups and owns their clocks, totals and the pending request under one lock;
    a second lock only serialises the slow part (gc can take 100 ms), so nothing else ever
    waits on it."""

    def __init__(self, backend: MemoryBackend, cooldown_s: float, wait_s: float = 10.0) -> None:
        self._backend = backend
        self.cooldown_s = cooldown_s
        self.wait_s = wait_s  # how long a slot's start waits for a cleanup begun between slots
        self._lock = threading.Lock()
        self._running = threading.Lock()
        # Signalled when a cleanup started between slots ends: a slot waits for it to finish
        # rather than have empty_cache run on another thread beside its kernels.
        self._idle_done = threading.Condition(self._lock)
        self._idle_cleanups = 0  # guarded by _lock
        # --- guarded by _lock ---
        self._clock_at: dict[str, float] = {}  # clock -> monotonic start of its last cleanup
        self._last_by_clock: dict[str, CleanupResult] = {}
        self._last: CleanupResult | None = None
        self._counts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._freed_total = 0
        self._last_failure_log: float | None = None
        self._generation_thread: int | None = None
        # (allocated, reserved) after the last cleanup that freed nothing: a second one in the
        # same state would free nothing either.
        self._futile_state: tuple[int, int] | None = None
        # Read without the lock by the guards on every call, as a hint: None is the fast path.
        self.pending: PendingCleanup | None = None

    # -- running one ---------------------------------------------------------------------------

    def run(self, reason: str, *, cooldown: bool = True) -> CleanupResult:
        """Run a cleanup now. Raises ``CleanupCooldownError`` when ``cooldown`` and the
        reason's clock is within ``cooldown_s`` of its last cleanup; re-raises a failure of
        the backend after counting it (the clock is then left as it was)."""
        clock = _CLOCKS.get(reason)
        now = time.monotonic()
        with self._lock:
            if cooldown:
                self._check_clock(clock, now)
            previous = self._clock_at.get(clock) if clock else None
            if clock:
                self._clock_at[clock] = now  # claim it before the slow part
        try:
            with self._running:
                t0 = time.perf_counter()
                before = self._backend.sample()
                gc.collect()
                self._backend.empty_cache()
                after = self._backend.sample()
                duration = time.perf_counter() - t0
        except Exception as exc:
            self._failed(reason, clock, previous, exc)
            raise
        freed = max(0, before.reserved_bytes - after.reserved_bytes)
        result = CleanupResult(reason, freed, before.reserved_bytes, after.reserved_bytes,
                               after.allocated_bytes, duration, utc_timestamp())
        with self._lock:
            self._counts[reason] += 1
            self._freed_total += freed
            self._last = result
            self._futile_state = (None if freed else
                                  (after.allocated_bytes, after.reserved_bytes))
            if clock and not freed and reason != "http" and clock == "discretionary":
                # An automatic cleanup that freed nothing does not hold the operator's clock:
                # it did not make the operator's request pointless. The operator's own
                # cleanups keep it, freed or not (they cost the loop a gc pass each).
                if previous is None:
                    self._clock_at.pop(clock, None)
                else:
                    self._clock_at[clock] = previous
            elif clock:
                self._last_by_clock[clock] = result
        # The card's "Emergency cleanup freed 150MB (11.1GB → 10.95GB)", in GB as every
        # other figure an operator reads (the CLI says "freed 0.150 GB" of the same cleanup).
        logger.info(
            "Emergency cleanup freed %s (%s → %s), reason=%s", fmt_gb(freed),
            *gb_figures(before.reserved_bytes, after.reserved_bytes), reason,
            extra={"vram_event": "emergency_cleanup", "reason": reason, "freed_mb": freed / MB,
                   "reserved_before_gb": to_gb(before.reserved_bytes),
                   "reserved_after_gb": to_gb(after.reserved_bytes),
                   "duration_s": round(duration, 4), "device": self._backend.device},
        )
        return result

    def automatic(self, reason: str, *, recovery: bool) -> CleanupAttempt:
        """A cleanup the monitor decided on; a recovery ignores the clock. Never raises: the
        guard reports the pressure, and a failed cleanup must not mask it. Skipped in the very
        state a cleanup already freed nothing in, and when the allocator cannot be read; the
        attempt says which."""
        try:
            state = self._backend.sample()
        except Exception:
            return CleanupAttempt("unreadable")  # fails open, as every guard read
        if self.futile(state):
            logger.debug("automatic %s cleanup skipped: the last one freed nothing in "
                         "this state", reason)
            return CleanupAttempt("futile")
        try:
            return CleanupAttempt("ran", self.run(reason, cooldown=not recovery))
        except CleanupCooldownError as exc:
            logger.debug("automatic cleanup skipped: %s", exc)
            return CleanupAttempt("cooling_down", retry_after_s=exc.retry_after_s)
        except Exception:
            return CleanupAttempt("failed")  # counted and logged (rate-limited) by run()

    def futile(self, s: AllocatorSample) -> bool:
        """Whether the last cleanup freed nothing and the allocator is still as it left it."""
        with self._lock:
            return self._futile_state == (s.allocated_bytes, s.reserved_bytes)

    def _check_clock(self, clock: str | None, now: float) -> None:
        if clock is None or clock not in self._clock_at:
            return
        left = self._clock_at[clock] + self.cooldown_s - now
        if left > 0:
            raise CleanupCooldownError(left, self._last_by_clock.get(clock))

    def _failed(self, reason: str, clock: str | None, previous: float | None,
                exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures[reason] += 1
            if clock is not None:
                if previous is None:
                    self._clock_at.pop(clock, None)
                else:
                    self._clock_at[clock] = previous
            log = (self._last_failure_log is None
                   or now - self._last_failure_log >= FAILURE_LOG_INTERVAL_S)
            if log:
                self._last_failure_log = now
        if log:
            logger.error("Emergency cleanup failed, reason=%s: %s: %s", reason,
                         type(exc).__name__, exc,
                         extra={"vram_event": "cleanup_failed", "reason": reason,
                                "device": self._backend.device})

    # -- requests from other threads -------------------------------------------------------

    def request(self, reason: str, wait_s: float,
                stop: threading.Event | None = None) -> CleanupResult | None:
        """A cleanup that obeys its clock, run where the allocator is in use.

        Runs at once when no generation is running or when called from the generation thread;
        otherwise registers it for the generation thread (joining one already registered, so
        it runs once however many asked) and waits up to ``wait_s`` for its result. Returns
        ``None`` when it is still scheduled after the wait.
        """
        me = threading.get_ident()
        idle = False
        with self._lock:
            pending = self.pending
            mine = self._generation_thread == me
            if pending is not None and mine:
                # Asked for from the generation thread while another thread's request waits
                # for its boundary: this is the boundary. One cleanup answers both.
                self.pending = None
                run_now = False
            elif pending is None:
                self._check_clock(_CLOCKS.get(reason), time.monotonic())
                run_now = self._generation_thread is None or mine
                idle = self._generation_thread is None
                if idle:
                    self._idle_cleanups += 1
                elif not run_now:
                    pending = self.pending = PendingCleanup(reason)
            else:
                run_now = False
        if pending is not None and mine:
            self._fulfil(pending)
        elif run_now:
            try:
                return self.run(reason)
            finally:
                if idle:
                    with self._lock:
                        self._idle_cleanups -= 1
                        self._idle_done.notify_all()
        if not self._wait(pending, wait_s, stop):
            return None
        if pending.error is not None:
            raise pending.error
        return pending.result

    @staticmethod
    def _wait(pending: PendingCleanup, wait_s: float, stop: threading.Event | None) -> bool:
        """Wait for the generation thread to carry ``pending`` out; give up early when
        ``stop`` is set (the control plane is shutting down)."""
        if stop is None:
            return pending.done.wait(wait_s)
        deadline = time.monotonic() + wait_s
        while not pending.done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if stop.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def enter_generation(self, slot: int | None = None) -> bool:
        """A slot starts on this thread: a cleanup that began between slots finishes first
        (waited for up to ``wait_s``: a stuck ``empty_cache`` must not stall the loop for good,
        so past it the slot starts, with a WARNING), and from now on a cleanup asked for on
        another thread waits for this thread's boundaries. False, registering nothing, when a
        generation is registered already (the tracker refuses the second one)."""
        with self._lock:
            if self._generation_thread is not None:
                return False
            finished = self._idle_done.wait_for(lambda: not self._idle_cleanups, self.wait_s)
            if self._generation_thread is not None:
                return False
            self._generation_thread = threading.get_ident()
        if not finished:
            logger.warning("slot %s starts beside a cleanup begun between slots that still runs "
                           "after %gs (cleanup_wait_s): empty_cache is stuck, or very slow",
                           slot, self.wait_s)
        return True

    def leave_generation(self) -> None:
        """The slot ended, however it ended: carry out what was asked for meanwhile."""
        with self._lock:
            self._generation_thread = None
            pending, self.pending = self.pending, None
        if pending is not None:
            self._fulfil(pending)

    def run_pending(self) -> None:
        """At a boundary of the generation thread: carry out a registered cleanup, if any."""
        with self._lock:
            pending = self.pending
            if pending is None or self._generation_thread != threading.get_ident():
                return
            self.pending = None
        self._fulfil(pending)

    def _fulfil(self, pending: PendingCleanup) -> None:
        # Admitted when it was registered: no second cooldown check. A failure goes to the
        # requesters (and the counters), never into the generation loop.
        try:
            pending.result = self.run(pending.reason, cooldown=False)
        except Exception as exc:
            pending.error = exc
        finally:
            pending.done.set()

    # -- reads ----------------------------------------------------------------------------------

    def retry_after(self, reason: str = "http") -> float:
        """Seconds until a cleanup for ``reason`` may run again; 0 when it may run now."""
        clock = _CLOCKS.get(reason)
        with self._lock:
            at = self._clock_at.get(clock) if clock else None
        return 0.0 if at is None else max(0.0, at + self.cooldown_s - time.monotonic())

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def totals(self) -> tuple[int, int, int]:
        """(cleanups run, reserved bytes they freed, cleanups that failed)."""
        with self._lock:
            return (sum(self._counts.values()), self._freed_total,
                    sum(self._failures.values()))

    def by_reason(self) -> tuple[dict[str, int], dict[str, int]]:
        """(cleanups run, cleanups failed), each by reason."""
        with self._lock:
            return dict(self._counts), dict(self._failures)

    def last(self) -> CleanupResult | None:
        with self._lock:
            return self._last
