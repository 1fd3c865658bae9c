"""The project's warnings and errors.

Warnings subclass ``UserWarning`` so callers can filter or escalate them with the
``warnings`` module; errors subclass ``RuntimeError`` as the task card asks.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from app.units import fmt_gb

if TYPE_CHECKING:
    from app.monitor.records import CleanupAttempt, CleanupResult


class MemoryPressureWarning(UserWarning):
    """Usage crossed the soft limit. Generation continues."""


class MemoryLeakWarning(UserWarning):
    """Allocated memory after generations grew past the leak threshold over the leak window."""


class AccountingWarning(UserWarning):
    """A figure would silently be zero: a model loaded with no bytes placed on the device, a
    module registered whose tensors the device did not place, a meta storage made on a
    thread where no capture is open while one is open on another. The message names the
    cause and the fix. Shown (once per place) unless filtered: no log line stands in for it
    where the mistake is made in a test or a notebook."""


# The monitor logs each of these itself, and that log line is what an operator reads: a copy
# printed by the warnings module would say every one twice. So, as Python does for
# DeprecationWarning, they are not shown unless asked for; any filter a caller sets (``-W
# error`` or ``-W default``, ``simplefilter``, ``pytest.warns``, ``catch_warnings``) comes
# before this one, appended last, and decides instead.
for _category in (MemoryPressureWarning, MemoryLeakWarning):
    warnings.filterwarnings("ignore", category=_category, append=True)


class MemoryPressureError(RuntimeError):
    """The hard limit was, or would be, crossed; the generation must abort.

    ``reason`` says which guard raised it: ``"hard_limit"`` (usage above it),
    ``"allocation_refused"`` (a request that would cross it), ``"buffers"``
    (``validate_buffers``) or ``"oom"`` (an OOM that slipped past the guards). A refused
    allocation carries ``projected_bytes``: the usage it would have reached. ``cleanup`` (an
    ``app.monitor.CleanupAttempt``, and the end of the message) says what became of the
    cleanup attempted before the error: it ran and freed so much, or why none ran (nothing to
    release, ``emergency_cleanup`` off, cooling down, ...); ``None`` where none is attempted
    (``buffers``).
    """

    def __init__(self, message: str, reason: str = "hard_limit",
                 projected_bytes: int | None = None,
                 cleanup: CleanupAttempt | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.projected_bytes = projected_bytes
        self.cleanup = cleanup


class VortexInitializationError(RuntimeError):
    """The device cannot host the Director (pre-flight failed, no CUDA, bad device)."""


class CleanupCooldownError(RuntimeError):
    """A cleanup was asked for within the cooldown of the previous one of its kind.

    ``last`` is that previous cleanup (``None`` while it is still running): the message says
    what it was, when it ran and who asked for it.
    """

    def __init__(self, retry_after_s: float, last: CleanupResult | None = None) -> None:
        if last is None:
            why = "a cleanup is running now"
        else:
            why = (f"last cleanup: {last.reason} at {last.timestamp}, "
                   f"freed {fmt_gb(last.freed_bytes)}")
        super().__init__(
            f"emergency cleanup is cooling down; retry in {retry_after_s:.1f}s ({why})")
        self.retry_after_s = retry_after_s
        self.last = last
