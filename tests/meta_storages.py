"""A test's own count of the meta storages PyTorch code creates: the reference the models'
tests and app.backends.capture are checked against, kept independent of the latter."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class NewStorages(TorchDispatchMode):
    """The bytes of each meta storage the ops create, in order, and the peak of the live ones.

    An output whose storage is among the op's inputs' is a view or an in-place result, not new.
    A storage's end is seen by ``weakref.finalize`` on it: PyTorch keeps one Python object per
    storage alive for as long as any tensor uses it. CPU tensors (lengths, durations) are not
    device memory and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.live = 0
        self.peak = 0

    @property
    def count(self) -> int:
        return len(self.sizes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or not t.is_meta:
                continue
            storage = t.untyped_storage()
            if storage._cdata in seen:
                continue
            seen.add(storage._cdata)
            nbytes = storage.nbytes()
            self.sizes.append(nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, nbytes)
        return out
