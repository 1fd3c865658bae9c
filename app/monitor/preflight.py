"""The pre-flight check: can this card host the Director, before any model loads."""

from __future__ import annotations

import logging

from app.backends import MemoryBackend
from app.errors import VortexInitializationError
from app.monitor.records import GB, PreflightResult

logger = logging.getLogger("app.monitor.monitor")


def preflight(backend: MemoryBackend, required_bytes: int,
              hard_limit_bytes: int) -> PreflightResult:
    """See ``VRAMMonitor.preflight``. Available means what this process can hold: free
    device memory plus what its allocator already reserved, within any per-process cap."""
    s = backend.sample()
    dm = backend.device_memory(s)
    available = min(dm.free_bytes + s.reserved_bytes, dm.total_bytes)
    if available < required_bytes:
        raise VortexInitializationError(
            f"Insufficient VRAM: {available / GB:.1f}GB available, "
            f"{required_bytes / GB:.1f}GB required. Upgrade to RTX 3060 12GB or higher."
        )
    if hard_limit_bytes > dm.total_bytes:
        raise VortexInitializationError(
            f"Hard limit {hard_limit_bytes / GB:.2f}GB (VORTEX_HARD_LIMIT_GB) exceeds the "
            f"card's total memory {dm.total_bytes / GB:.2f}GB"
        )
    logger.info("VRAM pre-flight passed: %.1fGB available, %.1fGB required",
                available / GB, required_bytes / GB)
    return PreflightResult(available, required_bytes, dm.total_bytes)
