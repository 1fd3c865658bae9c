"""Bytes an ``nn.Module`` holds on a device."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def module_bytes(module: torch.nn.Module, owns: Callable[[torch.Tensor], bool]) -> int:
    """Sum the unique storages of ``module``'s parameters and buffers for which ``owns`` holds.

    Storages, not tensors: tied weights and views share one storage and are counted once,
    and a view's whole storage is what the allocator holds.
    """
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for t in _tensors(module):
        if not owns(t):
            continue
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            continue
        key = (t.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total
