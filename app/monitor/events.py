"""Python warnings that can never fail a slot, and that point at the caller's line.

The monitor logs every excursion and leak itself: the log line is the operator's record, and
it is printed once. The ``warnings`` module is a second channel, for code: callers that filter,
record (``pytest.warns``, ``catch_warnings(record=True)``) or escalate them. So that a warning
is not printed twice (the log line, then the same text from ``warnings``), ``app.errors``
makes the warnings module ignore these two categories unless a filter asks for them
(``-W default``, ``simplefilter``), as Python does for ``DeprecationWarning``.

When a filter does show one, its location is the caller's line: the first frame outside the
monitor (``app/monitor``, ``app/guards.py`` and the ``contextlib`` frames of ``generation()``),
the Director's ``check_limits(...)`` or ``with monitor.generation(...)``, not ``sys:1``.

Under ``warnings.simplefilter("error")`` or ``python -W error`` a warning becomes an exception,
which would abort the very slot the soft limit promises to let run: such an escalation is
caught here and dropped (the log line has already said it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

logger = logging.getLogger(__name__)

_MONITOR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_INTERNAL_FILES = frozenset({  # app.guards is not imported: it imports the monitor
    os.path.abspath(contextlib.__file__),
    os.path.join(os.path.dirname(os.path.dirname(_MONITOR_DIR)), "guards.py"),
})


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_MONITOR_DIR) or path in _INTERNAL_FILES


def caller_stacklevel() -> int:
    """The ``stacklevel`` that ``warnings.warn`` called by this function's caller needs to
    name the first frame outside the monitor (1 would name that caller)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn_safely(warning: Warning, *, enabled: bool = True) -> None:
    """``warnings.warn(warning)`` at the caller's line; never raises; a no-op when ``enabled``
    is False."""
    if not enabled:
        return
    try:
        warnings.warn(warning, stacklevel=caller_stacklevel())
    except Warning:
        logger.debug("%s escalated to an error by a warnings filter; not raised into the "
                     "generation loop", type(warning).__name__)
