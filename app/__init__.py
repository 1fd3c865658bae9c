"""vortex-vram: the VRAM manager of the Vortex Director node.

The public names below are imported on first use (PEP 562), so that a light part of the
package, the ``vortex-vram`` command above all, does not pay for torch and FastAPI (3 s) when
it imports ``app.cli``. ``from app import VRAMMonitor`` works as with eager imports.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from app._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("ControlPlane", "ControlPlaneError", "create_app", "start_control_plane"),
                    "app.api"),
    **dict.fromkeys(("CudaBackend", "MemoryBackend", "SimulatedBackend", "simulated_rtx_3060"),
                    "app.backends"),
    **dict.fromkeys(("AllocationTrace", "Capture", "as_loaded"), "app.backends.capture"),
    "flash_attention": "app.backends.kernels.attention",
    "Rehearsal": "app.backends.rehearsal",
    **dict.fromkeys(("Settings", "SettingsError", "load_settings"), "app.config"),
    **dict.fromkeys(("AccountingWarning", "CleanupCooldownError", "MemoryLeakWarning",
                     "MemoryPressureError",
                     "MemoryPressureWarning", "VortexInitializationError"), "app.errors"),
    **dict.fromkeys(("check_allocation", "check_limits", "clear_cuda_cache",
                     "get_current_vram_usage", "get_monitor", "get_vram_breakdown",
                     "install_monitor"), "app.guards"),
    **dict.fromkeys(("Admission", "Forecast", "GenerationRecord", "MIN_SCALE", "ModelRecord",
                     "SlotPreset", "StagePlan", "VRAMMonitor", "VRAMSnapshot"), "app.monitor"),
}

__all__ = [
    "MIN_SCALE",
    "AccountingWarning",
    "Admission",
    "AllocationTrace",
    "Capture",
    "CleanupCooldownError",
    "ControlPlane",
    "ControlPlaneError",
    "CudaBackend",
    "Forecast",
    "GenerationRecord",
    "MemoryBackend",
    "MemoryLeakWarning",
    "MemoryPressureError",
    "MemoryPressureWarning",
    "ModelRecord",
    "Rehearsal",
    "Settings",
    "SettingsError",
    "SimulatedBackend",
    "SlotPreset",
    "StagePlan",
    "VRAMMonitor",
    "VRAMSnapshot",
    "VortexInitializationError",
    "__version__",
    "as_loaded",
    "check_allocation",
    "check_limits",
    "clear_cuda_cache",
    "create_app",
    "flash_attention",
    "get_current_vram_usage",
    "get_monitor",
    "get_vram_breakdown",
    "install_monitor",
    "load_settings",
    "simulated_rtx_3060",
    "start_control_plane",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once: later lookups don't come back here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from app.api import ControlPlane, ControlPlaneError, create_app, start_control_plane
    from app.backends import CudaBackend, MemoryBackend, SimulatedBackend, simulated_rtx_3060
    from app.backends.capture import AllocationTrace, Capture, as_loaded
    from app.backends.kernels.attention import flash_attention
    from app.backends.rehearsal import Rehearsal
    from app.config import Settings, SettingsError, load_settings
    from app.errors import (
        AccountingWarning,
        CleanupCooldownError,
        MemoryLeakWarning,
        MemoryPressureError,
        MemoryPressureWarning,
        VortexInitializationError,
    )
    from app.guards import (
        check_allocation,
        check_limits,
        clear_cuda_cache,
        get_current_vram_usage,
        get_monitor,
        get_vram_breakdown,
        install_monitor,
    )
    from app.monitor import (
        MIN_SCALE,
        Admission,
        Forecast,
        GenerationRecord,
        ModelRecord,
        SlotPreset,
        StagePlan,
        VRAMMonitor,
        VRAMSnapshot,
    )
