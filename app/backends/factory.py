"""Which backend a monitor watches: chosen by ``VORTEX_BACKEND`` / ``VORTEX_DEVICE``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.backends.base import MemoryBackend
from app.backends.cuda import CudaBackend
from app.backends.simulated import SimulatedBackend
from app.config import Settings, load_settings

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "simulated")
# An RTX 3060 "12GB" has 12 GiB; its CUDA context holds a few hundred MB.
RTX_3060_BYTES = 12 * 2**30
RTX_3060_CONTEXT_BYTES = 350_000_000


def simulated_rtx_3060(index: int = 0) -> SimulatedBackend:
    """The simulated card the demo runs on: a 12 GB RTX 3060 with its CUDA context."""
    return SimulatedBackend(RTX_3060_BYTES, context_bytes=RTX_3060_CONTEXT_BYTES,
                            device=f"sim:{index}", name="Simulated RTX 3060 (12 GB)")


def make_backend(
    kind: str = "auto",
    *,
    device: int = 0,
    memory_history: bool = False,
    history_dir: str | Path = "vram-postmortem",
    max_dumps: int = 5,
) -> MemoryBackend:
    """``cuda``: CUDA device ``device`` (``VortexInitializationError`` naming the reason when
    there is none); ``simulated``: the simulated RTX 3060; ``auto``: CUDA when torch sees a
    device, else the simulated card, with a WARNING, since a production Director that lost
    its GPU must not look healthy: production sets ``cuda``."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}: one of {', '.join(BACKENDS)}")
    if kind == "simulated":
        return simulated_rtx_3060(device)
    if kind == "auto" and not torch.cuda.is_available():
        logger.warning(
            "VORTEX_BACKEND=auto and torch sees no CUDA device (torch %s, CUDA runtime %s): "
            "monitoring a SIMULATED 12 GB RTX 3060. Set VORTEX_BACKEND=cuda to insist on a GPU.",
            torch.__version__, torch.version.cuda or "none")
        return simulated_rtx_3060(device)
    return CudaBackend(device, memory_history=memory_history, history_dir=history_dir,
                       max_dumps=max_dumps)


def default_backend(settings: Settings | None = None) -> MemoryBackend:
    """The backend ``settings`` (by default ``load_settings()``) name: ``VORTEX_BACKEND``,
    ``VORTEX_DEVICE`` and ``VORTEX_MEMORY_HISTORY*``."""
    if settings is None:
        settings = load_settings()
    return make_backend(settings.backend, device=settings.device,
                        memory_history=settings.memory_history,
                        history_dir=settings.memory_history_dir,
                        max_dumps=settings.memory_history_max_dumps)
