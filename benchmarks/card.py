"""A 12 GB card for the benchmarks: the simulated RTX 3060, or the lent GPU capped to 12 GB."""

from __future__ import annotations

import torch

from app.backends import CudaBackend, MemoryBackend
from app.demo.director import make_backend
from app.demo.workload import CudaDevice, Device

CARD_BYTES = 12e9


def make_card(simulate: bool, workload: str = "synthetic"
              ) -> tuple[MemoryBackend, Device, str]:
    """(backend, device, description). On CUDA the per-process memory fraction makes the
    real allocator refuse past ~12 GB, whatever the GPU's size. ``workload="models"``: the
    five real architectures, on the simulated card (they are built on meta)."""
    if workload == "models":
        backend, device = make_backend("simulated", workload="models")
        return backend, device, "simulated 12 GB RTX 3060, real models"
    if simulate or not torch.cuda.is_available():
        backend, device = make_backend("simulated")
        return backend, device, "simulated 12 GB RTX 3060"
    total = torch.cuda.get_device_properties(0).total_memory
    backend = CudaBackend(0, memory_fraction=min(1.0, CARD_BYTES / total))
    return backend, CudaDevice(0), f"{torch.cuda.get_device_name(0)} capped to 12 GB"
