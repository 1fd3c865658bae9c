"""The model registry: what each resident model holds, its budget, and whether buffers fit."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from app.backends import MemoryBackend
from app.errors import AccountingWarning, MemoryPressureError
from app.monitor.limits import integral
from app.monitor.modules import module_bytes
from app.monitor.records import GB, ModelRecord
from app.units import fmt_gb, gb_figures

logger = logging.getLogger("app.monitor.monitor")


def budget_bytes(budget_gb: float | None) -> int | None:
    if budget_gb is None:
        return None
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, int | float) or not budget_gb > 0:
        raise ValueError(f"budget_gb must be a positive number of GB, got {budget_gb!r}")
    return int(budget_gb * GB)


class ModelRegistry:
    """Owns the resident models under one lock."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._models: dict[str, ModelRecord] = {}

    @contextmanager
    def track_load(self, name: str, budget_gb: float | None = None, *,
                   replace: bool = False,
                   read: Callable[[], int | None] | None = None) -> Iterator[list[int]]:
        """Register ``name`` with the allocated bytes its loading adds; yields a one-item list
        that holds those bytes once the block ends. Nothing is registered if loading raises;
        a name already registered is refused before anything loads. ``read`` gives allocated
        bytes or None when the backend cannot be read (the monitor's fail-open read): then
        the model is registered as unmeasured, with 0 bytes, and a warning says so."""
        budget = budget_bytes(budget_gb)
        self._refuse_duplicate(name, replace)
        if read is None:
            def read() -> int | None:
                return self._backend.sample().allocated_bytes
        before = read()
        added: list[int] = []
        yield added
        after = read()
        measured = before is not None and after is not None
        added.append(max(0, after - before) if measured else 0)
        if not measured:
            logger.warning("model %s loaded while the backend could not be read: registered "
                           "with 0 bytes (unmeasured)", name)
        elif not added[0]:
            self._silent_zero(
                f"model {name!r} added 0 bytes to {self._backend.device} while it loaded, and "
                f"is registered with 0 against its budget: {self._where_it_went()}")
        self.add(ModelRecord(name, added[0], budget,
                             "allocator_delta" if measured else "unmeasured"), replace=replace)

    def _where_it_went(self) -> str:
        from app.backends.simulated import SimulatedBackend

        if isinstance(self._backend, SimulatedBackend):
            return ("nothing it made was placed on the simulated card. Build it inside "
                    "card.capture(), through as_loaded(build) called inside it: a module built "
                    "outside a capture, or loaded by as_loaded outside one, stays on meta "
                    "uncounted")
        return ("its tensors are not on this device: move it there inside "
                "track_model_load (.to(device)), or register it with register_model")

    @staticmethod
    def _silent_zero(message: str) -> None:
        logger.warning("%s", message)
        warnings.warn(message, AccountingWarning, stacklevel=4)

    def register_module(self, name: str, module: torch.nn.Module,
                        budget_gb: float | None = None, *, replace: bool = False) -> int:
        """Register an already-loaded module by the unique storages it holds on this device."""
        budget = budget_bytes(budget_gb)
        self._refuse_duplicate(name, replace)
        nbytes = module_bytes(module, self._backend.owns)
        held = module_bytes(module, lambda _t: True)
        if not nbytes and held:
            devices = sorted({str(t.device) for t in (*module.parameters(), *module.buffers())})
            self._silent_zero(
                f"register_model({name!r}): none of the module's {held:,} bytes of tensors "
                f"(on {', '.join(devices)}) were placed by {self._backend.device}, so it is "
                f"registered with 0: {self._where_it_went()}")
        self.add(ModelRecord(name, nbytes, budget, "module_storages"), replace=replace)
        return nbytes

    @staticmethod
    def _check_name(name: object) -> None:
        """A name that every view can print on one line: logs, metrics labels, tables."""
        if not isinstance(name, str) or not name.strip() or len(name) > 128 or any(
                not c.isprintable() for c in name):
            raise ValueError(f"model name {name!r} must be a non-empty printable string of at "
                             "most 128 characters (no line breaks or control characters)")

    def _refuse_duplicate(self, name: str, replace: bool) -> None:
        self._check_name(name)
        with self._lock:
            known = name in self._models
        if known and not replace:
            raise ValueError(
                f"model {name!r} is already registered; unregister_model({name!r}) first, or "
                "pass replace=True")

    def add(self, record: ModelRecord, *, replace: bool = False) -> None:
        with self._lock:
            if record.name in self._models and not replace:
                raise ValueError(f"model {record.name!r} is already registered")
            self._models[record.name] = record
        if record.budget_bytes is None:
            logger.info("model %s resident: %s", record.name, fmt_gb(record.vram_bytes))
            return
        resident, budget = gb_figures(record.vram_bytes, record.budget_bytes)
        logger.info("model %s resident: %s (budget %s)", record.name, resident, budget)
        if record.over_budget:
            logger.warning("model %s over budget: %s > %s", record.name, resident, budget)

    def remove(self, name: str) -> ModelRecord | None:
        with self._lock:
            return self._models.pop(name, None)

    def models(self) -> list[ModelRecord]:
        with self._lock:
            return list(self._models.values())

    def total_bytes(self) -> int:
        with self._lock:
            return sum(m.vram_bytes for m in self._models.values())

    def validate_buffers(self, buffers: Mapping[str, int], usage_bytes: int,
                         hard_limit_bytes: int) -> int:
        """See ``VRAMMonitor.validate_buffers``; ``usage_bytes`` is on the limit basis."""
        sizes = {}
        for name, value in buffers.items():
            nbytes = integral(value)
            if nbytes is None or nbytes < 0:
                raise ValueError(
                    f"buffer {name!r} must be a non-negative int of bytes, got {value!r}")
            sizes[name] = nbytes
        resident = max(usage_bytes, self.total_bytes())
        running, misfits = resident, []
        for name, nbytes in sizes.items():
            running += nbytes
            if running > hard_limit_bytes:
                misfits.append(f"{name} ({fmt_gb(nbytes)})")
        if misfits:
            total = sum(sizes.values())
            hard, models, headroom, wanted = gb_figures(
                hard_limit_bytes, resident, hard_limit_bytes - resident, total)
            raise MemoryPressureError(
                f"Buffers do not fit under hard_limit={hard} next to resident models "
                f"{models}: {', '.join(misfits)} (all buffers {wanted}, headroom {headroom})",
                reason="buffers",
            )
        return hard_limit_bytes - running
