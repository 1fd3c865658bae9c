"""Python warnings that can never fail a slot.

The monitor logs every excursion and leak itself; the ``warnings`` module is a second channel
for callers that filter or record them. Under ``warnings.simplefilter("error")`` or
``python -W error`` that channel turns a warning into an exception, which would abort the very
slot the soft limit promises to let run: such an escalation is caught here and dropped (the
log line has already said it).
"""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger(__name__)


def warn_safely(warning: Warning, *, enabled: bool = True, stacklevel: int = 2) -> None:
    """``warnings.warn(warning)`` that never raises; a no-op when ``enabled`` is False."""
    if not enabled:
        return
    try:
        warnings.warn(warning, stacklevel=stacklevel + 1)
    except Warning:
        logger.debug("%s escalated to an error by a warnings filter; not raised into the "
                     "generation loop", type(warning).__name__)
