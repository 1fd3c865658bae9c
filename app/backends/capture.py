"""Real PyTorch code on the simulated card: every storage that code creates on the ``meta``
device is placed by the caching allocator's rules and freed when the storage dies.

PyTorch runs model code on ``meta`` with real shapes and dtypes and no memory, so a Flux
forward pass makes its few thousand real allocations in real order, and the simulated card
holds them as a 12 GB card's allocator would. How storages are followed is PyTorch's own
way, as ``torch.distributed._tools.mem_tracker`` does it: a ``TorchDispatchMode`` sees each
op's outputs, and a weak reference to each output's ``UntypedStorage`` (whose Python object
PyTorch preserves while the storage lives) says when the storage dies. Three rules of this
module differ from mem_tracker, which counts what a whole program holds:

* A storage is *charged* when an op inside the capture returns it and none of that op's
  inputs holds it: views (``aten.t``, ``view``), in-place and ``out=`` results share a block
  already placed, or one from before the capture, which is never charged.
* A charged storage whose size changes (``resize_``, an ``out=`` that grows its output) is
  placed again, as ``resize_bytes_cuda`` allocates a new block, copies, and frees the old.
  mem_tracker also patches ``UntypedStorage.resize_``, which no dispatch mode sees; model code
  resizes through ``Tensor.resize_`` and ``out=``, which it does see, so this module patches
  nothing global.
* A storage's death does not free its block at once: the weak reference's callback may run
  inside the garbage collector while the card's lock is held on this very thread, where
  freeing would deadlock. It queues the block; the card frees the queue before its next read
  or allocation (``SimulatedBackend._free_queued``), so every figure the monitor reads is
  exact.

Inside a capture the card's kernels run too (``kernels=False`` leaves them out): what a real
card's kernels allocate inside themselves goes through the same caching allocator, and a meta
forward pass makes none of it. app/backends/kernels holds each rule and its source:

* attention takes the kernel an RTX 3060 picks (FlashAttention-2, else the memory-efficient
  kernel, with its fp32 accumulator past a head dim of 128), not meta's math path, which
  materialises the whole score matrix in fp32;
* nn.LSTM/GRU/RNN allocate what cuDNN's one call does, not meta's per-step decomposition;
* a convolution's cuDNN workspace is placed after its output and freed after the call, and
  when it does not fit, the call goes on without it, as cuDNN tries its next plan (the
  allocator counted the OOM first);
* the first matmul on the card places cuBLAS's workspace, which stays (it belongs to the
  card, not to the pass: a recording leaves it out of the trace).

A capture follows the thread that entered it only: PyTorch keeps dispatch modes per thread,
so a tensor made on a worker thread is not charged (enter ``capture()`` on that thread too).
That would be a silent zero, so while a capture is open every thread started from
``threading`` gets a watch (``_Elsewhere``) that, the first time an op there makes a meta
tensor with no capture open on that thread, raises an ``AccountingWarning`` naming both
threads and the fix. (Threads already running when the capture opened are not watched:
Python 3.11 cannot set a profile function on them.)
Storages charged inside a capture stay on the card after it ends, until they die: a model
loaded inside one stays resident.

Captures of one card nest: one entered while another of the same card is open on the thread
(``with card.capture(): ... with card.capture(record=True) as step:``) adds no second
dispatch mode, which would see each op once more (the outer mode charges what the inner one
then finds charged already, and a convolution would place two workspaces). It rides on the
open one: the open one charges, and every recording capture open on the thread, inner and
outer, records what is charged and freed while it is open.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.backends.base import OutOfMemoryError
from app.backends.kernels import convolution, cublas

if TYPE_CHECKING:
    from app.backends.simulated import SimulatedBackend

_META = torch.device("meta")
# The ops a capture can see a convolution or a matmul as: under inference_mode PyTorch does not
# decompose the composite ones (conv2d, linear) before a dispatch mode sees them.
_CONVOLUTIONS = frozenset(getattr(torch.ops.aten, name) for name in (
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d"))
_MATMULS = frozenset(getattr(torch.ops.aten, name) for name in cublas.MATMUL_OPS)
M = TypeVar("M", bound=torch.nn.Module)


def as_loaded(build: Callable[[], M]) -> M:
    """``build()``'s module as a checkpoint loader leaves it on the card: built with no
    capture watching (its init may make tensors in another dtype first: Flux's bf16
    skeleton is 23.8 GB before its Linears are packed to 4 bits), then every parameter and
    buffer given fresh storage of its final shape and dtype, one tensor at a time, under the
    captures in force, as ``init_empty_weights`` and ``load_state_dict(assign=True)`` do.
    Call it inside ``SimulatedBackend.capture()``; ``build`` should make the module on meta
    (``with torch.device("meta"):``). A module itself is refused (``TypeError``): built
    already, it would be called as a forward pass."""
    from torch.utils._python_dispatch import _disable_current_modes

    if isinstance(build, torch.nn.Module) or not callable(build):
        raise TypeError(f"as_loaded() takes a callable that builds the module, not "
                        f"{type(build).__name__}: pass as_loaded(lambda: MyModel()), with "
                        "the module built inside it")
    with _disable_current_modes():
        module = build()
    return module.to_empty(device=_META)


@dataclass(frozen=True)
class AllocationTrace:
    """The allocations and frees one capture made, in order, for replaying without the model
    code: an event ``n >= 0`` allocates ``n`` bytes (the i-th such event is allocation ``i``),
    ``n < 0`` frees allocation ``~n``. ``marks`` names where each part begins (``mark()``):
    ``(name, index of its first event)``. Allocations still live at the end are what the
    captured code kept (its outputs). ``optional``: the allocations a kernel does without when
    they do not fit (a convolution's workspace): a replay that cannot place one goes on."""

    events: tuple[int, ...]
    marks: tuple[tuple[str, int], ...] = ()
    optional: frozenset[int] = frozenset()

    @property
    def allocations(self) -> int:
        """How many allocations the trace makes."""
        return sum(1 for e in self.events if e >= 0)

    def parts(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """``(name, events)`` for each marked part, in order; events before the first mark
        are a part named ``""``."""
        bounds = list(self.marks)
        if not bounds or bounds[0][1] > 0:
            bounds.insert(0, ("", 0))
        for (name, start), (_, end) in zip(bounds, [*bounds[1:], ("", len(self.events))],
                                           strict=True):
            yield name, self.events[start:end]

    FORMAT = "vortex-vram allocation trace"

    def to_dict(self) -> dict[str, Any]:
        """The trace as JSON can hold it (``from_dict`` reads it back): what
        ``vortex-vram whatif --trace`` takes."""
        return {"format": self.FORMAT, "version": 1, "events": list(self.events),
                "marks": [[name, at] for name, at in self.marks],
                "optional": sorted(self.optional)}

    @classmethod
    def from_dict(cls, data: object) -> AllocationTrace:
        """A trace from ``to_dict``'s form, checked: every free names an allocation made
        before it and not freed yet, marks and optional allocations are in range. A
        ``ValueError`` says what is wrong, with the index of the event."""
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} (its \"format\" field says what it is)")
        if data.get("version") != 1:
            raise ValueError(f"version {data.get('version')!r} of the trace format is not "
                             "known here (1 is)")
        events = data.get("events")
        if not isinstance(events, list):
            raise ValueError("\"events\" must be a list of integers")
        made = 0
        freed: set[int] = set()
        for i, e in enumerate(events):
            if isinstance(e, bool) or not isinstance(e, int):
                raise ValueError(f"events[{i}] must be an integer, got {e!r:.40}")
            if e >= 0:
                made += 1
            elif ~e >= made or ~e in freed:
                raise ValueError(f"events[{i}] frees allocation {~e}, which "
                                 + ("is freed already" if ~e in freed else "is not made yet"))
            else:
                freed.add(~e)
        marks = data.get("marks", [])
        optional = data.get("optional", [])
        if not isinstance(marks, list) or not all(
                isinstance(m, list) and len(m) == 2 and isinstance(m[0], str)
                and isinstance(m[1], int) and not isinstance(m[1], bool)
                and 0 <= m[1] <= len(events) for m in marks):
            raise ValueError("\"marks\" must be a list of [name, event index] pairs")
        if not isinstance(optional, list) or not all(
                isinstance(o, int) and not isinstance(o, bool) and 0 <= o < made
                for o in optional):
            raise ValueError("\"optional\" must list allocation indices of the trace")
        return cls(tuple(events), tuple((name, at) for name, at in marks),
                   frozenset(optional))

    def peak_bytes(self) -> int:
        """The most requested bytes live at once over the trace (before the allocator's
        rounding)."""
        sizes: list[int] = []
        live = peak = 0
        for e in self.events:
            if e >= 0:
                sizes.append(e)
                live += e
                peak = max(peak, live)
            else:
                live -= sizes[~e]
        return peak


class _Charge:
    """One charged storage: the card's handle for its block, the size placed, the weak
    reference that frees it, and its allocation index in each capture that recorded it."""

    __slots__ = ("handle", "indices", "nbytes", "ref")

    def __init__(self, handle: int, nbytes: int, indices: dict[Capture, int]) -> None:
        self.handle = handle
        self.nbytes = nbytes
        self.indices = indices
        self.ref: weakref.ref[torch.UntypedStorage] | None = None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    # An op's arguments and results are tensors, or (nested) lists and tuples of them.
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


# The threads with a capture open (ident -> its name, and how many are open there: captures
# of several cards may be), for the watch on other threads.
_capturing: dict[int, tuple[str, int]] = {}
_capturing_lock = threading.Lock()
_their_hook: Callable[..., Any] | None = None


def _opened() -> None:
    me = threading.get_ident()
    with _capturing_lock:
        first = not _capturing
        _capturing[me] = (threading.current_thread().name, _capturing.get(me, ("", 0))[1] + 1)
    if first:
        global _their_hook
        _their_hook = threading.getprofile()  # a profiler's, kept and chained
        threading.setprofile(_watch_new_thread)


def _closed() -> None:
    me = threading.get_ident()
    with _capturing_lock:
        name, n = _capturing.get(me, ("", 1))
        if n > 1:
            _capturing[me] = (name, n - 1)
        else:
            _capturing.pop(me, None)
        last = not _capturing
    if last:
        threading.setprofile(_their_hook)  # type: ignore[arg-type]


def _watch_new_thread(frame: Any, event: str, arg: Any) -> None:
    """The profile function of a thread started while a capture is open: its first event
    puts the watch on the thread, then hands the thread to the profile function there was
    before (none, or a profiler's)."""
    import sys

    hook = _their_hook
    sys.setprofile(hook)
    if _capturing:
        _Elsewhere().__enter__()  # for the thread's life: cheap once it has warned
    if hook is not None:
        hook(frame, event, arg)


class _Elsewhere(TorchDispatchMode):
    """Warns, once, when an op on this thread makes a meta tensor while a capture is open on
    another thread and none on this one: what it makes is charged to no card."""

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self._warned or not _capturing:
            return out
        me = threading.get_ident()
        if me in _capturing or not any(t.device == _META for t in _tensors(out)):
            return out
        self._warned = True
        import warnings

        from app.errors import AccountingWarning

        others = ", ".join(repr(name) for name in sorted({n for n, _ in _capturing.values()}))
        warnings.warn(
            f"a meta tensor was made on thread {threading.current_thread().name!r} while a "
            f"capture is open on thread {others} only: it is charged to no card (PyTorch "
            "keeps dispatch modes per thread). Enter card.capture() on this thread too",
            AccountingWarning, stacklevel=2)
        return out


class Capture(TorchDispatchMode):
    """The context manager ``SimulatedBackend.capture()`` returns; see the module docstring.

    ``record=True`` keeps the allocations and frees in order; :meth:`trace` returns them.
    ``kernels=False``: meta's own kernels (math attention, decomposed RNNs, no workspaces).
    """

    def __init__(self, card: SimulatedBackend, *, record: bool = False,
                 kernels: bool = True) -> None:
        super().__init__()
        self._card = card
        # id(storage) -> charge, while it lives: the card's, shared by all its captures, so
        # that a storage is charged once however many captures see it.
        self._charged: dict[int, _Charge] = card._charged
        self._events: list[int] | None = [] if record else None
        self._marks: list[tuple[str, int]] = []
        self._optional: set[int] = set()
        self._allocations = 0
        self._recording = record
        self._kernels = kernels
        self._modes = ExitStack()
        self.absorbed_ooms = 0  # workspaces that did not fit, gone without (cuDNN's retries)
        # Nesting (module docstring): the capture of this card open on the thread that this
        # one rides on, or the captures riding on this one.
        self._host: Capture | None = None
        self._riders: list[Capture] = []
        self._thread = 0

    # -- what a caller sees -------------------------------------------------------------

    def mark(self, name: str) -> None:
        """Begin a named part of the trace (``trace().parts()``: a stage); a no-op unless
        recording."""
        if self._events is not None:
            self._marks.append((name, len(self._events)))

    def trace(self) -> AllocationTrace:
        """The allocations and frees recorded so far, in order (``record=True``); what is
        still live at the end is what the captured code kept."""
        if self._events is None:
            raise RuntimeError("capture(record=True) records a trace; this one did not")
        return AllocationTrace(tuple(self._events), tuple(self._marks),
                               frozenset(self._optional))

    def __enter__(self) -> Capture:
        self._thread = threading.get_ident()
        host = self._card._open_captures.get(self._thread)
        if host is not None:  # nested: ride on the capture already open here
            self._host = host
            host._riders.append(self)
            return self
        super().__enter__()
        self._card._open_captures[self._thread] = self
        _opened()
        if self._kernels:
            from app.backends.kernels.attention import CardAttention
            from app.backends.kernels.rnn import CardRNN

            self._modes.enter_context(CardAttention())
            self._modes.enter_context(CardRNN())
        return self

    def __exit__(self, *exc: object) -> None:
        self._recording = False  # frees after the end are the outputs being dropped
        if self._host is not None:
            self._host._riders.remove(self)
            self._host = None
            self._card._free_queued_now()
            return
        self._modes.close()
        super().__exit__(*exc)
        if self._card._open_captures.get(self._thread) is self:
            del self._card._open_captures[self._thread]
        _closed()
        self._card._free_queued_now()

    def _recorders(self) -> list[Capture]:
        """The recording captures open on this thread: this one and those riding on it."""
        return [c for c in (self, *self._riders) if c._recording]

    def _note(self, nbytes: int, *, workspace: bool = False) -> dict[Capture, int]:
        """An allocation, in every recording capture open: its index in each. A workspace is
        freed at once and marked optional (a replay goes on without one that does not fit)."""
        indices: dict[Capture, int] = {}
        if not (self._recording or self._riders):
            return indices  # nothing records: the common case, a model loading
        for c in self._recorders():
            index = c._allocations
            c._allocations += 1
            assert c._events is not None
            c._events.append(nbytes)
            if workspace:
                c._optional.add(index)
                c._events.append(~index)
            indices[c] = index
        return indices

    # -- the dispatch -----------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self._kernels and func.overloadpacket in _MATMULS and self._card._cublas is None:
            self._card._place_cublas_workspace()
        out = func(*args, **kwargs)
        inputs: set[int] | None = None
        for t in _tensors(out):
            if t.device != _META:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            charge = self._charged.get(key)
            nbytes = storage.nbytes()
            if charge is None:
                if inputs is None:
                    inputs = {id(i.untyped_storage()) for i in _tensors((args, kwargs))
                              if i.device == _META}
                if key in inputs:
                    continue  # a view or in-place result of a storage from before the capture
                self._charge(storage, key, nbytes)
            elif charge.nbytes != nbytes:
                self._replace(storage, key, charge, nbytes)
        if self._kernels and func.overloadpacket in _CONVOLUTIONS:
            self._workspace(args, out)
        return out

    def _workspace(self, args: tuple, out: Any) -> None:
        """cuDNN's workspace for a convolution just made: placed after its output, freed at the
        call's end; one that does not fit is gone without (cuDNN's next plan needs less)."""
        x, w = args[0], args[1]
        if not (isinstance(out, torch.Tensor) and x.device == w.device == out.device == _META):
            return
        nbytes = convolution.workspace_bytes(x, w, out)
        if nbytes <= 0:
            return
        # recorded whether it fits here or not: a replay elsewhere tries it again
        self._note(nbytes, workspace=True)
        try:
            handle = self._card.allocate(nbytes)
        except OutOfMemoryError:
            self.absorbed_ooms += 1
            return
        self._card.free(handle)

    def _charge(self, storage: torch.UntypedStorage, key: int, nbytes: int) -> None:
        # The card raises torch.OutOfMemoryError here, from inside the op that allocated.
        handle = self._card.allocate(nbytes)
        charge = _Charge(handle, nbytes, self._note(nbytes))
        charge.ref = weakref.ref(storage, self._died(key, charge))
        self._charged[key] = charge

    def _replace(self, storage: torch.UntypedStorage, key: int, old: _Charge,
                 nbytes: int) -> None:
        self._forget(key, old)
        self._charge(storage, key, nbytes)  # the new block first, as resize_bytes_cuda copies
        self._release(old)

    def _died(self, key: int, charge: _Charge):  # type: ignore[no-untyped-def]
        def callback(_ref: object) -> None:
            self._forget(key, charge)
            self._release(charge)
        return callback

    def _forget(self, key: int, charge: _Charge) -> None:
        if self._charged.get(key) is charge:
            del self._charged[key]
        charge.ref = None

    def _release(self, charge: _Charge) -> None:
        # Possibly inside the garbage collector, with the card's lock held: only queue.
        for c, index in charge.indices.items():
            if c._recording:
                assert c._events is not None
                c._events.append(~index)
        self._card._free_later(charge.handle)


__all__ = ["AllocationTrace", "Capture", "as_loaded"]
