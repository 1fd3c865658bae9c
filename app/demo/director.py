"""The demo Director: pre-flight, model loading, a paced generation loop calling the guards,
and the control plane beside it."""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from app.api import ControlPlane, start_control_plane
from app.backends import MemoryBackend, SimulatedBackend
from app.backends import make_backend as make_memory_backend
from app.config import Settings
from app.demo.slots import SlotResult, run_slot
from app.demo.workload import MB, MODELS, CudaDevice, Device, SimulatedDevice
from app.guards import install_monitor
from app.monitor import VRAMMonitor

logger = logging.getLogger(__name__)

@dataclass
class DirectorStats:
    slots: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # full, degraded, skipped, aborted
    abort_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def completed(self) -> int:
        return self.outcomes["full"] + self.outcomes["degraded"]

    @property
    def missed(self) -> int:
        return self.outcomes["skipped"] + self.outcomes["aborted"]


WORKLOADS = ("synthetic", "models")


def make_backend(
    kind: str | None = None, settings: Settings | None = None, workload: str = "synthetic"
) -> tuple[MemoryBackend, Device]:
    """The backend ``kind`` names (default: ``settings.backend``, ``VORTEX_BACKEND``) on
    ``settings.device``, and the demo's device that allocates on it: the synthetic workload,
    or (``workload="models"``, the simulated card only) the five real architectures."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    index = 0 if settings is None else settings.device
    history = {} if settings is None else {
        "memory_history": settings.memory_history,
        "history_dir": settings.memory_history_dir,
        "max_dumps": settings.memory_history_max_dumps,
    }
    kind = kind or (settings.backend if settings is not None else "auto")
    if workload == "models":
        if kind not in ("auto", "simulated"):
            raise ValueError("--workload models runs on the simulated card only (its models "
                             "are built on the meta device): use --backend simulated")
        kind = "simulated"
    backend = make_memory_backend(kind, device=index, **history)
    if workload == "models":
        from app.demo.real_models import ModelsDevice  # the optional extra: imported late

        return backend, ModelsDevice(backend)
    if isinstance(backend, SimulatedBackend):
        return backend, SimulatedDevice(backend)
    return backend, CudaDevice(index)


class Director:
    def __init__(
        self,
        settings: Settings,
        *,
        backend: str | None = None,
        slot_seconds: float = 0.25,
        work_ms: float = 0.0,
        pressure_every: int = 20,
        leak_mb: float = 0.0,
        seed: int | None = None,
        admission: bool = True,
        workload: str = "synthetic",
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.workload = workload
        self.backend, self.device = make_backend(backend, settings, workload)
        self.simulated = isinstance(self.backend, SimulatedBackend)
        self.monitor = VRAMMonitor.from_settings(settings, backend=self.backend)
        self.slot_seconds = slot_seconds
        self.work_s = work_ms / 1000
        self.pressure_every = pressure_every
        self.leak_bytes = int(leak_mb * MB)
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.stats = DirectorStats()
        self.control_plane: ControlPlane | None = None

    def start(self) -> None:
        """Pre-flight, the control plane, then the models: the control plane comes up
        first so operators can see a node that is still loading."""
        install_monitor(self.monitor)
        self.monitor.log_snapshot("startup")
        self.monitor.preflight()
        self.control_plane = start_control_plane(
            self.monitor, host=self.settings.host, port=self.settings.port,
            token=self.settings.token, allowed_hosts=self.settings.allowed_hosts)
        for spec in MODELS:
            with self.monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
                self.device.load(spec)
        self.monitor.log_snapshot("post_load")
        warm = getattr(self.device, "warm", None)
        if warm is not None:
            warm()  # the real models trace their stages before the first slot
            # What lives as long as the process (the real models: 600,000 objects) is kept
            # out of the collector's full passes, which would otherwise cost ~0.35 s in the
            # middle of whichever slot's rehearsal set one off.
            gc.collect()
            gc.freeze()

    def run(self, generations: int | None = None) -> DirectorStats:
        slot = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set() and (generations is None or slot < generations):
            slot += 1
            self.run_slot(slot)
            next_at += self.slot_seconds
            # Pace without burning a core; a stop request ends the wait at once.
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
            if next_at < time.monotonic() - 1.0:
                next_at = time.monotonic()  # fell behind: don't sprint to catch up
        return self.stats

    def run_slot(self, slot: int) -> SlotResult:
        """Admission, then the stages; the outcome is logged by ``run_slot`` and counted here
        and in the monitor's ``slot_outcomes``."""
        plan = self.device.plan(self.rng, self.pressure_every)
        result = run_slot(self.monitor, self.device, slot, plan, admission=self.admission,
                          fit=self.admission, work=self._work if self.work_s else None,
                          keep_bytes=self.leak_bytes)
        self.stats.slots += 1
        self.stats.outcomes[result.outcome] += 1
        if result.abort_reason is not None:
            self.stats.abort_reasons[result.abort_reason] += 1
        return result

    def _work(self, _stage: str) -> None:
        time.sleep(self.work_s)  # the stage's compute; a stop waits for it

    def stop(self) -> None:
        """Begin to stop: the running slot finishes, no new one starts, and /readyz says
        shutting_down from now on, so a balancer sends no more work."""
        self.stop_event.set()
        if self.control_plane is not None:
            self.control_plane.drain()

    def close(self) -> None:
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None
        install_monitor(None)
