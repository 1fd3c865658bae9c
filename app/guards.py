"""Synchronous guards for the generation loop, acting on the process-wide monitor.

Install the Director's monitor once with ``install_monitor()``; without one, the first
guard call builds a monitor from ``Settings`` on the first CUDA device. The guards are thin:
one global read and one method call on top of the monitor's own check.
"""

from __future__ import annotations

import logging
import threading

from app.config import load_settings
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)

_monitor: VRAMMonitor | None = None
_lazy = False  # _monitor was built by a guard call, not installed
_install_lock = threading.Lock()


def install_monitor(monitor: VRAMMonitor | None) -> None:
    """Make ``monitor`` the process-wide one (``None`` forgets it). Replacing the monitor that
    an earlier guard call built on its own is said in a WARNING: the figures and counts of
    that one (its own card, maybe a simulated one) are dropped."""
    global _monitor, _lazy
    with _install_lock:
        if _lazy and monitor is not None and monitor is not _monitor:
            logger.warning("install_monitor() replaces the monitor that a guard call built "
                           "before it (on %s); install the Director's monitor before the "
                           "first guard call", _monitor.device if _monitor else "?")
        _monitor, _lazy = monitor, False


def get_monitor() -> VRAMMonitor:
    """The process-wide monitor: the one ``install_monitor`` installed, else one built from
    the settings (with a WARNING naming ``install_monitor``)."""
    global _monitor, _lazy
    m = _monitor
    if m is not None:
        return m
    with _install_lock:
        if _monitor is None:
            _monitor = VRAMMonitor.from_settings(load_settings())
            _lazy = True
            logger.warning("a guard was called before install_monitor(): built a monitor from "
                           "the settings, on %s; a Director that built its own should call "
                           "install_monitor(monitor) first, or the guards watch another card",
                           _monitor.device)
        return _monitor


def check_limits(context: str = "") -> int:
    """Soft and hard limit check; see ``VRAMMonitor.check_limits``."""
    return get_monitor().check_limits(context)


def check_allocation(requested_bytes: int, context: str = "") -> int:
    """Refuse an allocation before it happens; see ``VRAMMonitor.check_allocation``."""
    return get_monitor().check_allocation(requested_bytes, context)


def get_current_vram_usage() -> int:
    """Allocated bytes on the monitored device (the task card's function)."""
    return get_monitor().backend.sample().allocated_bytes


def get_vram_breakdown() -> dict[str, float]:
    """Per-model resident memory in GB."""
    return get_monitor().get_vram_breakdown()


def clear_cuda_cache() -> int:
    """Emergency cleanup now; returns the reserved bytes freed."""
    return get_monitor().emergency_cleanup()
