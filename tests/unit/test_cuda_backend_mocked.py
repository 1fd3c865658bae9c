"""CudaBackend on a machine without a GPU: torch.cuda's functions answer from a fake device.

The fake returns the allocator's stats in the nested form ``torch._C._cuda_memoryStats(device)``
returns, which is what ``torch.cuda.memory_stats_as_nested_dict`` returns. The key names
(``allocated_bytes.all.current``, ``reserved_bytes``, ``inactive_split_bytes``, the ``peak``
metric, ``num_alloc_retries``, ``num_ooms``) are those of the ``memory_stats`` docstring in
torch/cuda/memory.py (torch 2.13.0), the function that flattens this nested dict.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app import CudaBackend, MemoryPressureError, VortexInitializationError
from app.backends import AllocatorSample, MemoryBackend, is_oom_error

MiB = 1 << 20
GiB = 1 << 30
H100_UUID = uuid.UUID("8f3c2a6e-51b4-4d0e-9c7a-0123456789ab")
NVIDIA_SMI_UUID = re.compile(r"^GPU-[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$")


class FakeCUuuid:
    """torch's ``_CUuuid``: ``bytes`` and a ``str()`` in the bare 8-4-4-4-12 form."""

    def __init__(self, value: uuid.UUID) -> None:
        self.bytes = list(value.bytes)
        self._value = value

    def __str__(self) -> str:
        return str(self._value)


@dataclass
class FakeDevice:
    """One card: what its caching allocator counts and what the driver reports."""

    name: str
    total: int
    held_elsewhere: int = 500 * MiB  # the CUDA context, other processes
    uuid: object = None
    allocated: int = 0
    reserved: int = 0
    peak: int = 0
    inactive_split: int = 0
    retries: int = 0
    ooms: int = 0
    fraction: float = 1.0

    def allocate(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated + self.inactive_split)

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes  # stays reserved, as in the caching allocator

    def stats(self) -> dict:
        def stat(current: int, peak: int) -> dict:
            pool = {"current": current, "peak": peak, "allocated": current + 7, "freed": 7}
            # The pools hold other figures than "all": a read of the wrong pool shows.
            half = {k: v // 2 + 1 for k, v in pool.items()}
            return {"all": pool, "large_pool": half, "small_pool": half}

        return {
            "allocated_bytes": stat(self.allocated, self.peak),
            "reserved_bytes": stat(self.reserved, self.reserved + 3 * MiB),
            "inactive_split_bytes": stat(self.inactive_split, self.inactive_split + MiB),
            "active_bytes": stat(self.allocated + 11, self.peak + 11),
            "requested_bytes": stat(self.allocated - 13, self.peak - 13),
            "num_alloc_retries": self.retries,
            "num_ooms": self.ooms,
            "num_oom_rejections": 0,
        }


@dataclass
class FakeCuda:
    """The torch.cuda calls CudaBackend makes, answered from ``devices``."""

    devices: list[FakeDevice]
    available: bool = True
    current: int = 0
    stats_reads: int = 0
    initialized: bool = False
    fraction_calls: list[tuple[float, int]] = field(default_factory=list)
    emptied: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)  # max_entries of each recording started
    clock_ns: int = 1_700_000_000 * 10**9

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        for name, fake in [
            ("is_available", lambda: self.available),
            ("device_count", lambda: len(self.devices)),
            ("init", self.init),
            ("mem_get_info", self.mem_get_info),
            ("set_per_process_memory_fraction", self.set_fraction),
            ("get_per_process_memory_fraction", lambda device: self.devices[device].fraction),
            ("empty_cache", self.empty_cache),
            ("reset_peak_memory_stats", self.reset_peak),
            ("device", self.device),
            ("current_device", lambda: self.current),
            ("get_device_properties", self.properties),
            ("memory_stats_as_nested_dict", self.read_stats),
        ]:
            monkeypatch.setattr(cuda, name, fake)
        monkeypatch.setattr(cuda.memory, "_record_memory_history", self.record_history)
        monkeypatch.setattr(cuda.memory, "_dump_snapshot", self.dump_snapshot)
        # Absent from CPU builds; CudaBackend prefers it where it exists.
        monkeypatch.setattr(torch._C, "_cuda_memoryStats", self.read_stats, raising=False)

    def init(self) -> None:
        self.initialized = True

    def mem_get_info(self, device: int) -> tuple[int, int]:
        d = self.devices[device]
        return d.total - d.held_elsewhere - d.reserved, d.total

    def set_fraction(self, fraction: float, device: int) -> None:
        self.fraction_calls.append((fraction, device))
        self.devices[device].fraction = fraction

    def empty_cache(self) -> None:
        d = self.devices[self.current]  # the real call acts on the current device
        d.reserved = d.allocated + d.inactive_split
        self.emptied.append(self.current)

    def reset_peak(self, device: int) -> None:
        self.devices[device].peak = self.devices[device].allocated

    @contextmanager
    def device(self, index: int) -> Iterator[None]:
        previous, self.current = self.current, index
        try:
            yield
        finally:
            self.current = previous

    def properties(self, device: int) -> SimpleNamespace:
        d = self.devices[device]
        props = SimpleNamespace(name=d.name, total_memory=d.total)
        if d.uuid is not None:  # torch releases before the uuid property lack the attribute
            props.uuid = d.uuid
        return props

    def read_stats(self, device: int) -> dict:
        self.stats_reads += 1
        return self.devices[device].stats()

    def record_history(self, enabled: str = "all", *, max_entries: int) -> None:
        self.history.append(max_entries)

    def dump_snapshot(self, filename: str) -> None:
        # Each dump is a second younger than the last, whatever the file system's resolution.
        self.clock_ns += 10**9
        Path(filename).write_bytes(b"snapshot")
        os.utime(filename, ns=(self.clock_ns, self.clock_ns))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda([
        FakeDevice("NVIDIA H100 80GB HBM3", 80 * GiB, uuid=FakeCUuuid(H100_UUID)),
        FakeDevice("NVIDIA A10", 24 * GiB, held_elsewhere=300 * MiB),
    ])
    fake.install(monkeypatch)
    return fake


def _identity_holds(dm, reserved: int) -> bool:
    return dm.free_bytes + reserved + dm.non_torch_bytes == dm.total_bytes


# ---------------------------------------------------------------------- construction


def test_is_a_memory_backend_named_like_nvidia_smi(fake):
    backend = CudaBackend(0)
    assert isinstance(backend, MemoryBackend)
    assert fake.initialized  # the context exists before the first sample
    assert (backend.device, backend.index) == ("cuda:0", 0)
    assert backend.name == "NVIDIA H100 80GB HBM3"
    assert backend.uuid == "GPU-8f3c2a6e-51b4-4d0e-9c7a-0123456789ab"
    assert NVIDIA_SMI_UUID.match(backend.uuid)


@pytest.mark.parametrize("raw, expected", [
    (None, None),  # torch without the property
    ("8f3c2a6e-51b4-4d0e-9c7a-0123456789ab", "GPU-8f3c2a6e-51b4-4d0e-9c7a-0123456789ab"),
    ("GPU-8F3C2A6E-51B4-4D0E-9C7A-0123456789AB", "GPU-8f3c2a6e-51b4-4d0e-9c7a-0123456789ab"),
    ("not a uuid", None),
])
def test_uuid_forms(fake, raw, expected):
    fake.devices[1].uuid = raw
    assert CudaBackend(1).uuid == expected


def test_name_and_uuid_are_read_once(fake):
    backend = CudaBackend(0)
    fake.devices[0].name, fake.devices[0].uuid = "changed", None
    assert (backend.name, backend.uuid) == ("NVIDIA H100 80GB HBM3", f"GPU-{H100_UUID}")


def test_without_cuda_the_error_says_what_to_do(fake):
    fake.available = False
    with pytest.raises(VortexInitializationError,
                       match=r"CUDA is not available \(torch .*\)\. .*SimulatedBackend"):
        CudaBackend(0)
    assert not fake.initialized


@pytest.mark.parametrize("index", [2, -1])
def test_a_device_that_does_not_exist(fake, index):
    with pytest.raises(VortexInitializationError,
                       match=rf"CUDA device {index} does not exist \(2 found\)"):
        CudaBackend(index)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, float("nan")])
def test_a_bad_memory_fraction_is_refused_before_it_is_set(fake, fraction):
    with pytest.raises(ValueError, match="memory_fraction must be in"):
        CudaBackend(0, memory_fraction=fraction)
    assert fake.fraction_calls == []


# ---------------------------------------------------------------------- sample


def test_sample_takes_every_field_from_its_key(fake):
    d = fake.devices[1]
    d.inactive_split = 6 * MiB
    d.allocate(700 * MiB)
    d.free(200 * MiB)
    d.retries, d.ooms = 3, 2
    fake.devices[0].allocate(GiB)  # another device: must not show
    assert CudaBackend(1).sample() == AllocatorSample(
        allocated_bytes=500 * MiB,
        reserved_bytes=706 * MiB,
        peak_allocated_bytes=700 * MiB,
        inactive_split_bytes=6 * MiB,
        num_alloc_retries=3,
        num_ooms=2,
    )


def test_sample_falls_back_to_the_public_stats_call(fake, monkeypatch):
    monkeypatch.delattr(torch._C, "_cuda_memoryStats")
    calls = []
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict",
                        lambda device: calls.append(device) or fake.devices[device].stats())
    fake.devices[1].allocate(64 * MiB)
    backend = CudaBackend(1)
    calls.clear()  # the constructor reads the device once (the non-torch share)
    assert backend.sample().allocated_bytes == 64 * MiB
    assert calls == [1]


# ---------------------------------------------------------------------- device_memory


def test_device_memory_on_the_whole_card(fake):
    backend = CudaBackend(0)
    fake.devices[0].allocate(3 * GiB)
    dm = backend.device_memory()
    assert dm.total_bytes == 80 * GiB
    assert dm.free_bytes == 80 * GiB - 500 * MiB - 3 * GiB
    assert dm.non_torch_bytes == 500 * MiB
    assert _identity_holds(dm, 3 * GiB)


@pytest.mark.parametrize("held_elsewhere, free, non_torch", [
    (500 * MiB, 10 * GiB, 0),  # the card to itself: the context lives outside the cap
    (75 * GiB, 3 * GiB, 7 * GiB),  # another process leaves less than the cap's headroom
    (78 * GiB, 0, 10 * GiB),  # nothing left on the device
])
def test_device_memory_on_a_capped_card(fake, held_elsewhere, free, non_torch):
    d = fake.devices[0]
    d.held_elsewhere = held_elsewhere
    backend = CudaBackend(0, memory_fraction=12 * GiB / d.total)
    assert fake.fraction_calls == [(12 * GiB / d.total, 0)]
    d.allocate(2 * GiB)
    s = backend.sample()
    dm = backend.device_memory(s)
    assert (dm.total_bytes, dm.free_bytes, dm.non_torch_bytes) == (12 * GiB, free, non_torch)
    assert _identity_holds(dm, s.reserved_bytes)


def test_a_cap_below_what_is_already_reserved(fake):
    fake.devices[0].allocate(20 * GiB)
    dm = CudaBackend(0, memory_fraction=0.125).device_memory()  # a 10 GiB cap
    assert (dm.total_bytes, dm.free_bytes, dm.non_torch_bytes) == (10 * GiB, 0, 0)


def test_device_memory_with_a_sample_does_not_read_the_allocator_again(fake):
    backend = CudaBackend(0)
    d = fake.devices[0]
    d.allocate(GiB)
    s = backend.sample()
    d.allocate(GiB)  # the allocator moves on between the two reads
    reads = fake.stats_reads
    dm = backend.device_memory(s)
    assert fake.stats_reads == reads
    # Consistent with the sample: the gigabyte reserved since counts as held elsewhere.
    assert _identity_holds(dm, s.reserved_bytes)
    assert dm.non_torch_bytes == 500 * MiB + GiB
    backend.device_memory()
    assert fake.stats_reads == reads + 1


# ---------------------------------------------------------------------- memory fraction


@pytest.mark.parametrize("torch_has_getter", [True, False])
def test_the_fraction_set_is_remembered(fake, monkeypatch, torch_has_getter):
    if not torch_has_getter:  # torch < 2.6
        monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    backend = CudaBackend(0, memory_fraction=0.25)
    fake.devices[0].fraction = 0.5  # someone else changes it: the backend keeps what it set
    assert backend.memory_fraction() == 0.25
    assert backend.device_memory().total_bytes == 20 * GiB


def test_without_a_fraction_set_torch_is_asked(fake, monkeypatch):
    backend = CudaBackend(0)
    fake.devices[0].fraction = 0.5
    assert backend.memory_fraction() == 0.5
    assert backend.device_memory().total_bytes == 40 * GiB
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    assert backend.memory_fraction() == 1.0
    assert backend.device_memory().total_bytes == 80 * GiB


# ---------------------------------------------------------------------- empty_cache, peak


def test_empty_cache_acts_on_the_backend_device(fake):
    for d in fake.devices:
        d.allocate(GiB)
        d.free(GiB)
    CudaBackend(1).empty_cache()
    assert fake.emptied == [1]
    assert fake.current == 0  # the caller's current device is left as it was
    assert (fake.devices[1].reserved, fake.devices[0].reserved) == (0, GiB)


def test_reset_peak_restarts_at_the_current_allocation(fake):
    backend = CudaBackend(1)
    for d in fake.devices:
        d.allocate(3 * GiB)
        d.free(2 * GiB)
    backend.reset_peak()
    assert backend.sample().peak_allocated_bytes == GiB
    assert fake.devices[0].peak == 3 * GiB


# ---------------------------------------------------------------------- post-mortem


def test_no_post_mortem_without_history(fake, tmp_path):
    backend = CudaBackend(0, history_dir=tmp_path / "pm")
    assert backend.dump_post_mortem("slot1") is None
    assert fake.history == []
    assert not (tmp_path / "pm").exists()


def test_post_mortem_dumps_rotate_oldest_first(fake, tmp_path):
    backend = CudaBackend(0, memory_history=True, history_dir=tmp_path / "pm", max_dumps=2,
                          history_entries=1234)
    assert fake.history == [1234]
    paths = [backend.dump_post_mortem("slot7") for _ in range(4)]  # one slot, within a second
    assert len(set(paths)) == 4
    assert sorted((tmp_path / "pm").iterdir()) == sorted(paths[-2:])


def test_post_mortem_file_name_is_sanitised(fake, tmp_path):
    backend = CudaBackend(0, memory_history=True, history_dir=tmp_path)
    path = backend.dump_post_mortem("../../etc/slot 3 é" + "x" * 60)
    assert path.parent == tmp_path and path.exists()
    assert re.fullmatch(r"oom-\d{8}T\d{6}-\d{3}-______etc_slot_3__x{22}\.pickle", path.name)


# ---------------------------------------------------------------------- owns


def test_owns_tensors_on_its_device_only(fake):
    def on(device: str) -> SimpleNamespace:
        return SimpleNamespace(device=torch.device(device))  # a CUDA tensor needs a GPU

    zero, one = CudaBackend(0), CudaBackend(1)
    assert zero.owns(on("cuda:0")) and not one.owns(on("cuda:0"))
    assert one.owns(on("cuda:1")) and not zero.owns(on("cuda:1"))
    fake.current = 1  # "cuda" means the current device
    assert one.owns(on("cuda")) and not zero.owns(on("cuda"))
    assert not zero.owns(torch.empty(1))


# ---------------------------------------------------------------------- is_oom_error


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call"),
    RuntimeError("CUDA driver error: out of memory"),
])
def test_device_allocation_failures_are_ooms(exc):
    assert is_oom_error(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you "
                  "passed in a non-contiguous input."),
    MemoryError("out of memory"),  # the host's, not the device's
    ValueError("out of memory"),
    MemoryPressureError("CUDA out of memory in slot 3: CUDA out of memory.", reason="oom"),
    KeyboardInterrupt(),
])
def test_other_errors_are_not(exc):
    assert not is_oom_error(exc)
