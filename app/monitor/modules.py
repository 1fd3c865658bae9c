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
    and a view's whole storage is what the allocator holds. A storage is known by its
    identity, not its ``data_ptr()``: every meta storage has data pointer 0. PyTorch keeps one
    Python object per live storage, and ``held`` keeps each alive, so no id is reused.
    """
    held: dict[int, torch.UntypedStorage] = {}
    for t in _tensors(module):
        if owns(t):
            storage = t.untyped_storage()
            held.setdefault(id(storage), storage)
    return sum(storage.nbytes() for storage in held.values())
