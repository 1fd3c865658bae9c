"""An OOM that slipped past the guards: what the slot is told, and the post-mortem it leaves.

``generation()`` turns ``torch.OutOfMemoryError`` (and cuBLAS/cuDNN allocation failures, see
``app.backends.is_oom_error``) into ``MemoryPressureError(reason="oom")`` naming the slot and
the stage, so a Director handles one exception for "this slot did not fit";
``track_model_load`` does the same for a model that does not fit, naming it and its budget.
Before the cleanup runs, the allocator history is written (CUDA with
``VORTEX_MEMORY_HISTORY``) so the post-mortem shows the memory as the OOM saw it.
"""

from __future__ import annotations

import logging

from app.backends import MemoryBackend
from app.errors import MemoryPressureError
from app.monitor.records import CleanupAttempt

logger = logging.getLogger("app.monitor.monitor")


def where(slot: int | None, stage: str | None) -> str:
    return f"slot {slot}" + (f", stage {stage}" if stage else "")


def oom_error(oom: BaseException, place: str,
              cleanup: CleanupAttempt | None = None) -> MemoryPressureError:
    """The error the caller gets for an OOM ``place`` ("in slot 9, stage flux", "loading
    model flux (budget 6.000GB)"): the first line of the allocator's, in its own words and
    PyTorch's binary units (MiB, GiB: 2^20, 2^30 bytes), said as such, since every figure the
    monitor writes itself is in decimal GB; then what became of the ``cleanup`` after it."""
    text = str(oom)
    first_line = text.splitlines()[0] if text else type(oom).__name__
    units = " (the allocator's message, in binary MiB/GiB)" if "iB" in first_line else ""
    after = "" if cleanup is None else f"; {cleanup.describe()}"
    return MemoryPressureError(f"CUDA out of memory {place}{units}: {first_line}{after}",
                               reason="oom", cleanup=cleanup)


def write_post_mortem(backend: MemoryBackend, tag: str) -> None:
    """The allocator history for memory_viz, where the backend records one (CUDA); a failure
    to write it is logged, never raised: the OOM is what the caller must hear of."""
    dump = getattr(backend, "dump_post_mortem", None)
    if dump is None:
        return
    try:
        path = dump(tag)
    except Exception as exc:
        logger.warning("could not write the OOM memory snapshot: %s: %s",
                       type(exc).__name__, exc)
        return
    if path is not None:
        logger.error("allocator history for the OOM written to %s "
                     "(open it in https://pytorch.org/memory_viz)", path)
