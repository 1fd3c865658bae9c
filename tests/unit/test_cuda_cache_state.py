"""CudaBackend's answers to the allocator model, on a CUDA whose caching allocator is the
simulated card: torch.cuda's stats, mem_get_info and snapshot calls read it, so the backend's
cheap answers can be checked against the card's exact ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app import CudaBackend, SimulatedBackend, VRAMMonitor
from app.errors import MemoryPressureError

GB = 1_000_000_000
MiB = 1 << 20


def nested(flat: dict) -> dict:
    """memory_stats() keys (``allocated_bytes.all.current``) in _cuda_memoryStats' nesting."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


class CardAsCuda:
    def __init__(self, card: SimulatedBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.card = card
        self.snapshots = 0
        self.device_reads = 0
        cuda = torch.cuda
        for name, fake in [
            ("is_available", lambda: True), ("device_count", lambda: 1),
            ("init", lambda: None), ("mem_get_info", self.mem_get_info),
            ("get_per_process_memory_fraction", lambda device: 1.0),
            ("get_device_properties",
             lambda device: SimpleNamespace(name="Card as CUDA", total_memory=card._total)),
        ]:
            monkeypatch.setattr(cuda, name, fake)
        monkeypatch.setattr(torch._C, "_cuda_memoryStats",
                            lambda device: nested(card.memory_stats()), raising=False)
        monkeypatch.setattr(torch.cuda.memory, "_snapshot", self.snapshot, raising=False)

    def mem_get_info(self, device: int) -> tuple[int, int]:
        self.device_reads += 1
        return self.card.device_memory().free_bytes, self.card._total

    def snapshot(self, device=None) -> dict:
        self.snapshots += 1
        return self.card.memory_snapshot()


@pytest.fixture
def card_and_cuda(monkeypatch):
    card = SimulatedBackend(12 * GB, context_bytes=400 * 10**6, alloc_conf="")
    return card, CardAsCuda(card, monkeypatch)


def pin(card: SimulatedBackend, count: int) -> None:
    groups = [[card.allocate(4 * MiB) for _ in range(5)] for _ in range(count)]
    for g in groups:
        for h in g[1:]:
            card.free(h)


def test_the_stats_answer_without_a_snapshot_when_no_cached_block_can_fit(card_and_cuda):
    card, cuda = card_and_cuda
    card.allocate(9 * GB)
    pin(card, 80)
    backend = CudaBackend(0)
    c = backend.cache_state(int(1.5 * GB))
    exact = card.cache_state(int(1.5 * GB))
    assert cuda.snapshots == 0  # 1.34 GB cached in 16 MiB holes < 1.5 GB: no block can fit
    assert (c.reuse_bytes, c.new_bytes) == (exact.reuse_bytes, exact.new_bytes)
    assert c.room_bytes == exact.room_bytes
    assert c.releasable_bytes == exact.releasable_bytes == 0
    assert c.inactive_split_bytes == exact.inactive_split_bytes


def test_a_snapshot_decides_a_possible_fit_and_is_reused_while_nothing_moves(card_and_cuda):
    card, cuda = card_and_cuda
    card.allocate(9 * GB)
    pin(card, 80)
    backend = CudaBackend(0)
    for _ in range(10):
        c = backend.cache_state(8 * MiB)  # 16 MiB holes could hold it: read the blocks
    assert cuda.snapshots == 1
    assert c.reuse_bytes == card.cache_state(8 * MiB).reuse_bytes == 16 * MiB
    assert not c.estimate
    card.allocate(8 * MiB)  # the cache moved; within the interval the old view answers
    c = backend.cache_state(8 * MiB)
    assert cuda.snapshots == 1 and c.estimate
    backend.snapshot_min_interval_s = 0.0
    c = backend.cache_state(8 * MiB)
    assert cuda.snapshots == 2 and not c.estimate


def test_the_guards_refuse_on_cuda_what_the_card_cannot_place(card_and_cuda):
    card, cuda = card_and_cuda
    card.allocate(9 * GB)
    pin(card, 80)
    monitor = VRAMMonitor(backend=CudaBackend(0), cleanup_cooldown_s=0)
    reads = cuda.device_reads
    monitor.check_allocation(64 * MiB)  # the common case: decided from the counters
    assert cuda.device_reads == reads and cuda.snapshots == 0
    with pytest.raises(MemoryPressureError, match="cannot place"):
        monitor.check_allocation(int(1.5 * GB), "latents")
    n = monitor.fit_allocation(int(1.5 * GB), "latents")
    assert n >= 0.75 * GB
    card.allocate(n)  # what fit_allocation grants can really be placed


def test_settings_come_from_torch(card_and_cuda, monkeypatch):
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings",
                        lambda: "expandable_segments:True,max_split_size_mb:64", raising=False)
    backend = CudaBackend(0)
    assert backend.allocator_settings.expandable_segments
    assert backend.allocator_settings.max_split_size_bytes == 64 * MiB
    assert backend.memory_snapshot()["allocator_settings"]["max_split_size_mb"] == 64
