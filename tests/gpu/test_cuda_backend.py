"""CudaBackend against the real caching allocator. Run with `pytest --gpu` on a GPU host."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from app import CudaBackend, VRAMMonitor

pytestmark = pytest.mark.gpu

MiB = 1 << 20
GiB = 1 << 30
NVIDIA_SMI_UUID = re.compile(r"^GPU-[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$")


@pytest.fixture
def cuda():
    torch.cuda.empty_cache()
    return CudaBackend(0)


def test_sample_agrees_with_torch(cuda):
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    s = cuda.sample()
    assert s.allocated_bytes == torch.cuda.memory_allocated()
    assert s.reserved_bytes == torch.cuda.memory_reserved()
    assert s.peak_allocated_bytes == torch.cuda.max_memory_allocated()
    dm = cuda.device_memory()
    free, total = torch.cuda.mem_get_info()
    assert dm.total_bytes == total
    assert abs(dm.free_bytes - free) < 64 * MiB
    assert dm.non_torch_bytes > 0  # the CUDA context at least
    del x


def test_empty_cache_lowers_reserved_not_allocated(cuda):
    keep = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    tmp = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    del tmp
    monitor = VRAMMonitor(backend=cuda, soft_limit_gb=1000, hard_limit_gb=1001)
    before = cuda.sample()
    freed = monitor.emergency_cleanup()
    after = cuda.sample()
    assert freed >= 512 * MiB
    assert after.allocated_bytes == before.allocated_bytes
    assert after.reserved_bytes == before.reserved_bytes - freed
    del keep


def test_register_model_matches_the_allocator_delta(cuda):
    monitor = VRAMMonitor(backend=cuda, soft_limit_gb=1000, hard_limit_gb=1001)
    with monitor.track_model_load("mlp"):
        model = torch.nn.Sequential(
            torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)
        ).cuda()
    tracked = monitor.models()[0].vram_bytes
    assert monitor.register_model("mlp2", model) == tracked
    assert cuda.owns(next(model.parameters()))
    assert not cuda.owns(torch.empty(1))


def test_generation_peak_on_cuda(cuda):
    monitor = VRAMMonitor(backend=cuda, soft_limit_gb=1000, hard_limit_gb=1001)
    with monitor.generation(1) as rec, monitor.stage("spike"):
        t = torch.empty(300 * MiB, dtype=torch.uint8, device="cuda")
        del t
    assert rec.activation_peak_bytes >= 300 * MiB
    assert rec.delta_bytes == 0


def test_device_memory_from_the_sample_adds_up(cuda):
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    s = cuda.sample()
    dm = cuda.device_memory(s)
    assert dm.free_bytes + s.reserved_bytes + dm.non_torch_bytes == dm.total_bytes
    assert dm.non_torch_bytes > 0  # the CUDA context at least
    del x


@pytest.fixture
def capped():
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info(0)[1]
    fraction = min(0.5, 4 * GiB / total)
    yield CudaBackend(0, memory_fraction=fraction), int(fraction * total)
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


def test_capped_card_adds_up(capped):
    backend, cap = capped
    x = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    s = backend.sample()
    dm = backend.device_memory(s)
    assert dm.total_bytes == cap
    assert dm.free_bytes + s.reserved_bytes + dm.non_torch_bytes == cap
    assert 0 <= dm.free_bytes <= cap - s.reserved_bytes
    # The context lives outside the cap: with the card to itself nothing else holds any of it.
    if torch.cuda.mem_get_info(0)[0] >= cap - s.reserved_bytes:
        assert dm.non_torch_bytes == 0
    del x


def test_name_and_uuid_as_nvidia_smi_prints_them(cuda):
    assert cuda.name == torch.cuda.get_device_properties(0).name
    if not hasattr(torch.cuda.get_device_properties(0), "uuid"):
        assert cuda.uuid is None
        return
    assert NVIDIA_SMI_UUID.match(cuda.uuid), cuda.uuid
    smi = shutil.which("nvidia-smi")
    if smi is not None:  # the same GPU by the same name in both tools
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, check=True).stdout
        assert f"UUID: {cuda.uuid})" in listing, listing
