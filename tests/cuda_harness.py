"""A CUDA whose caching allocator is the simulated card: torch.cuda's stats, ``mem_get_info``,
snapshot, settings and OOM-observer calls answer from a ``SimulatedBackend``, so that
``CudaBackend``'s cheap answers meet the card's exact ones on a machine without a GPU.

The card is the ground truth the guards are judged against: a verdict is checked by making
the allocation on the card (or on a ``clone()`` of it)."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from app import SimulatedBackend

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
    """Patches torch.cuda (through ``monkeypatch``) to read ``card``; ``card`` may be swapped
    for another (``use``) between trials, the patches staying."""

    def __init__(self, card: SimulatedBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.card = card
        self.snapshots = 0
        self.device_reads = 0
        cuda = torch.cuda
        for name, fake in [
            ("is_available", lambda: True), ("device_count", lambda: 1),
            ("init", lambda: None), ("mem_get_info", self.mem_get_info),
            ("get_per_process_memory_fraction", lambda device: self.card.memory_fraction()),
            ("get_device_properties",
             lambda device: SimpleNamespace(name="Card as CUDA", total_memory=self.card._total)),
            ("current_stream", lambda device=None: SimpleNamespace(cuda_stream=0)),
        ]:
            monkeypatch.setattr(cuda, name, fake)
        monkeypatch.setattr(torch._C, "_cuda_memoryStats",
                            lambda device: nested(self.card.memory_stats()), raising=False)
        monkeypatch.setattr(torch.cuda.memory, "_snapshot", self.snapshot, raising=False)
        monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings",
                            lambda: self.card.allocator_settings.text, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer",
                            lambda fn: self.card.attach_out_of_memory_observer(fn), raising=False)

    def use(self, card: SimulatedBackend) -> None:
        self.card = card

    def mem_get_info(self, device: int) -> tuple[int, int]:
        self.device_reads += 1
        return self.card.device_memory().free_bytes, self.card._total

    def snapshot(self, device=None) -> dict:
        self.snapshots += 1
        return self.card.memory_snapshot()


def fragmented_walk(card: SimulatedBackend, rng: random.Random, *, base_gb: tuple[float, float]
                    = (3.0, 8.0), steps: tuple[int, int] = (40, 300),
                    after_base: Callable[[], object] | None = None) -> list[int]:
    """benchmarks/guard_fuzz.py's walk on a simulated card: a resident base, activations up
    to a random headroom, then mixed allocations and frees (the pressed, fragmented states
    the H200 probe walked the real allocator into). Returns the live handles."""
    from benchmarks.guard_fuzz import walk

    class OnCard:
        allocate, free = card.allocate, card.free

        @staticmethod
        def allocated() -> int:
            return card.sample().allocated_bytes

        @staticmethod
        def room() -> int:
            return card.cache_state(0).room_bytes

    return walk(OnCard(), rng, base=True, after_base=after_base, steps=steps,
                base_gb=base_gb, free_activations=True)  # type: ignore[return-value]


def places(card: SimulatedBackend, nbytes: int) -> bool:
    """Whether the allocator places ``nbytes`` now, tried on a copy of the card."""
    try:
        card.clone().allocate(nbytes)
    except torch.OutOfMemoryError:
        return False
    return True
