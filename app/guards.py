"""Synchronous guards for the generation loop, acting on the process-wide monitor.

Install the Director's monitor once with ``install_monitor()``; without one, the first
guard call builds a monitor from ``Settings`` on the first CUDA device. The guards are thin:
one global read and one method call on top of the monitor's own check.
"""

from __future__ import annotations

import threading

from app.config import load_settings
from app.monitor import VRAMMonitor

_monitor: VRAMMonitor | None = None
_install_lock = threading.Lock()


def install_monitor(monitor: VRAMMonitor | None) -> None:
    """Make ``monitor`` the process-wide one (``None`` forgets it)."""
    global _monitor
    with _install_lock:
        _monitor = monitor


def get_monitor() -> VRAMMonitor:
    global _monitor
    m = _monitor
    if m is not None:
        return m
    with _install_lock:
        if _monitor is None:
            _monitor = VRAMMonitor.from_settings(load_settings())
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
