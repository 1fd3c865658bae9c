"""Memory backends: where the monitor's figures come from."""

from app.backends.alloc_conf import AllocatorSettings, parse_alloc_conf
from app.backends.base import (
    ALLOCATION_ROUNDING,
    AllocatorSample,
    CacheState,
    DeviceMemory,
    MemoryBackend,
    OutOfMemoryError,
    is_oom_error,
)
from app.backends.cuda import CudaBackend
from app.backends.factory import default_backend, make_backend, simulated_rtx_3060
from app.backends.simulated import SimulatedBackend

__all__ = [
    "ALLOCATION_ROUNDING",
    "AllocatorSample",
    "AllocatorSettings",
    "CacheState",
    "CudaBackend",
    "DeviceMemory",
    "MemoryBackend",
    "OutOfMemoryError",
    "SimulatedBackend",
    "default_backend",
    "is_oom_error",
    "make_backend",
    "parse_alloc_conf",
    "simulated_rtx_3060",
]
