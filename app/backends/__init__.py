"""Memory backends: where the monitor's figures come from."""

from app.backends.base import (
    AllocatorSample,
    DeviceMemory,
    MemoryBackend,
    OutOfMemoryError,
    is_oom_error,
)
from app.backends.cuda import CudaBackend
from app.backends.simulated import SimulatedBackend

__all__ = [
    "AllocatorSample",
    "CudaBackend",
    "DeviceMemory",
    "MemoryBackend",
    "OutOfMemoryError",
    "SimulatedBackend",
    "default_backend",
    "is_oom_error",
]


def default_backend() -> MemoryBackend:
    """The first CUDA device; ``VortexInitializationError`` with a clear message without one."""
    return CudaBackend(0)
