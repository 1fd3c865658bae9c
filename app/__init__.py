"""vortex-vram: the VRAM manager of the Vortex Director node."""

from app._version import __version__
from app.api import ControlPlane, ControlPlaneError, create_app, start_control_plane
from app.backends import CudaBackend, MemoryBackend, SimulatedBackend
from app.config import Settings, SettingsError, load_settings
from app.errors import (
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
    Admission,
    Forecast,
    GenerationRecord,
    ModelRecord,
    VRAMMonitor,
    VRAMSnapshot,
)

__all__ = [
    "Admission",
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
    "Settings",
    "SettingsError",
    "SimulatedBackend",
    "VRAMMonitor",
    "VRAMSnapshot",
    "VortexInitializationError",
    "__version__",
    "check_allocation",
    "check_limits",
    "clear_cuda_cache",
    "create_app",
    "get_current_vram_usage",
    "get_monitor",
    "get_vram_breakdown",
    "install_monitor",
    "load_settings",
    "start_control_plane",
]
