"""Admission refusals in the log: the first of a run at once, then at most one line per kind
per ``interval_s`` with the count and the slots, and one line when slots are admitted again.

A Director whose every slot is refused (a leak, a model too large for what is left) would
otherwise log each refusal, alike but for the slot number: 20 lines a second at
``--slot-seconds 0.05``, long after ``/readyz`` said ``not_producing``. Every refusal is still
counted (``admissions`` in the snapshot and ``/metrics``) and logged at DEBUG.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.monitor.records import Admission

logger = logging.getLogger("app.monitor.monitor")

REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass
class _Run:
    """The refusals of one kind since the run began, and those since its last line."""

    first_slot: int | None
    line_at: float  # the clock when this kind last had a line
    total: int = 1
    held: int = 0  # refused since that line
    held_from: int | None = None
    last_slot: int | None = None


def _slots(first: int | None, last: int | None) -> str:
    return f"slot {first}" if first == last else f"slots {first}-{last}"


class RefusalLog:
    """Owns the runs of refusals under one lock; logs after releasing it."""

    def __init__(self, device: str, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._device = device
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}  # kind -> its run; empty while slots are admitted

    def refused(self, a: Admission, kind: str) -> None:
        """``a`` refused a slot for ``kind`` of reason (the verdict's bound)."""
        now = self._clock()
        summary: tuple[int, int | None, int | None] | None = None
        with self._lock:
            run = self._runs.get(kind)
            if run is None:
                self._runs[kind] = _Run(a.slot, now, last_slot=a.slot)
            else:
                run.total += 1
                run.held += 1
                if run.held == 1:
                    run.held_from = a.slot
                run.last_slot = a.slot
                if now - run.line_at >= self.interval_s:
                    summary = (run.held, run.held_from, a.slot)
                    run.held, run.line_at = 0, now
        if run is None:
            logger.info("admission refuse for slot %s: %s (further refusals like it: at most "
                        "one line every %gs)", a.slot, a.reason, self.interval_s,
                        extra={"vram_event": "admission", **a.to_dict(), "device": self._device})
        elif summary is not None:
            held, first, last = summary
            logger.info("admission: %d more slots refused (%s) in the last %.0fs, the latest: "
                        "%s", held, _slots(first, last), self.interval_s, a.reason,
                        extra={"vram_event": "admission_refusals", "kind": kind,
                               "refused": held, "first_slot": first, "last_slot": last,
                               "device": self._device})
        else:
            logger.debug("admission refuse for slot %s: %s", a.slot, a.reason)

    def admitted(self, a: Admission) -> None:
        """``a`` admitted a slot: a run of refusals, if one was going on, has ended."""
        if not self._runs:  # read without the lock, as a hint: every admit passes here
            return
        with self._lock:
            runs, self._runs = self._runs, {}
        if not runs:
            return
        total = sum(r.total for r in runs.values())
        first = min((r.first_slot for r in runs.values() if r.first_slot is not None),
                    default=None)
        last = max((r.last_slot for r in runs.values() if r.last_slot is not None),
                   default=None)
        logger.info("admission: slots admitted again from slot %s, after %d slots refused "
                    "(%s)", a.slot, total, _slots(first, last),
                    extra={"vram_event": "admission_resumed", "refused": total,
                           "first_slot": first, "last_slot": last, "device": self._device})
