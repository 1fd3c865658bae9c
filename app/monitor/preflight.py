"""The pre-flight check: can this card host the Director, before any model loads."""

from __future__ import annotations

import logging

from app.backends import MemoryBackend
from app.errors import VortexInitializationError
from app.monitor.records import PreflightResult
from app.units import gb_figures

logger = logging.getLogger("app.monitor.monitor")


def preflight(backend: MemoryBackend, required_bytes: int,
              hard_limit_bytes: int) -> PreflightResult:
    """See ``VRAMMonitor.preflight``. Available means what this process can hold: free
    device memory plus what its allocator already reserved, within any per-process cap."""
    s = backend.sample()
    dm = backend.device_memory(s)
    available = min(dm.free_bytes + s.reserved_bytes, dm.total_bytes)
    # The card's own words and one decimal ("8.0GB available, 11.8GB required"), with more
    # where one decimal would print 11.8GB available of 11.8GB required.
    have, need = gb_figures(available, required_bytes, decimals=1)
    if available < required_bytes:
        raise VortexInitializationError(
            f"Insufficient VRAM: {have} available, {need} required. "
            "Upgrade to RTX 3060 12GB or higher."
        )
    if hard_limit_bytes > dm.total_bytes:
        hard, total = gb_figures(hard_limit_bytes, dm.total_bytes)
        raise VortexInitializationError(
            f"Hard limit {hard} (VORTEX_HARD_LIMIT_GB) exceeds the card's total memory {total}"
        )
    logger.info("VRAM pre-flight passed: %s available, %s required", have, need)
    return PreflightResult(available, required_bytes, dm.total_bytes)
