"""``memory_summary()``: torch's table, on the simulated card as on CUDA (issue 19), and the
NVML figures beside it.

torch's own ``torch.cuda.memory_summary`` reads a CUDA device's stats itself; here it is fed
the simulated card's ``memory_stats()`` in its place, so that our formatter is checked
against torch's code character for character rather than against a copy of its output.
"""

from __future__ import annotations

import types

import pytest
import torch.cuda.memory

from app import SimulatedBackend, VRAMMonitor
from app.backends.base import NO_TELEMETRY, DeviceTelemetry, format_memory_summary
from app.backends.cuda import NvmlReader

GB = 10**9


def _busy_card() -> SimulatedBackend:
    card = SimulatedBackend(12 * GB, context_bytes=350_000_000)
    handles = [card.allocate(n) for n in (512, 3000, 5 * 10**6, 700_000_000, 2 * GB)]
    card.free(handles[2])
    card.free(card.allocate(3 * GB))  # a peak, freed: cached
    return card


@pytest.mark.parametrize("abbreviated", [False, True])
def test_the_table_is_torchs_own(monkeypatch: pytest.MonkeyPatch, abbreviated: bool) -> None:
    card = _busy_card()
    stats = card.memory_stats()
    monkeypatch.setattr(torch.cuda.memory, "memory_stats", lambda device=None: stats)
    assert format_memory_summary(stats, 0, abbreviated) == torch.cuda.memory.memory_summary(
        0, abbreviated=abbreviated)


def test_the_simulated_card_and_the_monitor_give_it() -> None:
    card = _busy_card()
    text = VRAMMonitor(backend=card).memory_summary()
    assert text == card.memory_summary() == format_memory_summary(card.memory_stats(), 0)
    rows = {line.split("|")[1].strip(): line.split("|")[2:6] for line in text.splitlines()
            if line.count("|") == 6}
    assert rows["Allocated memory"][0].strip() == f"{card.sample().allocated_bytes // 2**20} MiB"
    assert rows["Allocations"][0].strip() == "4"
    assert SimulatedBackend(GB, device="sim:3").memory_summary().splitlines()[1].strip(
        "| ").endswith("device ID 3")


def test_an_unreadable_card_raises() -> None:
    card = SimulatedBackend(GB)
    card.set_faults(reads=True)
    with pytest.raises(RuntimeError, match="device read failed"):
        card.memory_summary()


def test_the_simulated_card_has_no_telemetry() -> None:
    assert SimulatedBackend(GB).device_telemetry() == NO_TELEMETRY == DeviceTelemetry(
        None, None, None, None)


class FakeNvml(types.SimpleNamespace):
    """pynvml's calls as nvidia-ml-py names them; ``missing`` raise as an unsupported query."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, missing: tuple[str, ...] = (), init_fails: bool = False) -> None:
        super().__init__(calls=[], missing=missing, init_fails=init_fails)

    def _call(self, name: str, value: object) -> object:
        self.calls.append(name)
        if name in self.missing:
            raise RuntimeError(f"NVMLError_NotSupported: {name}")
        return value

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> object:
        assert isinstance(uuid, bytes)
        return ("handle", uuid)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return ("handle", index)

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> object:
        return self._call("util", types.SimpleNamespace(gpu=37, memory=12))

    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int:
        return self._call("temp", 61)

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        return self._call("power", 210_500)  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: object) -> int:
        return self._call("limit", 350_000)


def test_nvml_figures_by_uuid_read_once_a_second() -> None:
    nvml = FakeNvml()
    reader = NvmlReader("GPU-8f3c2a6e-51b4-4d0e-9c7a-0123456789ab", 0, nvml)
    assert reader.read() == DeviceTelemetry(37, 61, 210.5, 350.0)
    assert reader.read() == DeviceTelemetry(37, 61, 210.5, 350.0)
    assert nvml.calls.count("util") == 1  # the second read came from the last second's


def test_nvml_missing_figures_are_none_and_no_nvml_is_all_none(monkeypatch) -> None:
    reader = NvmlReader("GPU-1", 0, FakeNvml(missing=("power", "limit")))
    assert reader.read() == DeviceTelemetry(37, 61, None, None)
    assert NvmlReader("GPU-1", 0, FakeNvml(init_fails=True)).read() == NO_TELEMETRY
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # cuda:0 is NVML's device 1: no guess
    assert NvmlReader(None, 0, FakeNvml()).read() == NO_TELEMETRY
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert NvmlReader(None, 0, FakeNvml()).read().utilization_percent == 37
