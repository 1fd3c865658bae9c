"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` as an RTX 3060 runs them (cuDNN), for tensors on meta.

On meta (as on the CPU) ``torch._VF.lstm`` has no fused kernel: PyTorch decomposes it into one
``mm``/``sigmoid``/``tanh``/``cat`` group per layer, direction and time step, each making new
storages (~6,400 of the ~8,300 that five seconds of Kokoro make). On CUDA, ``at::lstm``
(aten/src/ATen/native/RNN.cpp) takes cuDNN whenever ``cudnn_is_acceptable(input)`` (cuDNN
enabled, a non-empty CUDA tensor) and calls ``_cudnn_impl`` → ``at::_cudnn_rnn``
(aten/src/ATen/native/cudnn/RNN.cpp), which runs the whole sequence, every layer and direction,
in one cuDNN call. What that call allocates, in inference (``train`` false, no autograd), in this
order, is what ``cudnn_rnn()`` allocates:

- ``x = input.contiguous()``, after ``input.transpose(0, 1)`` for an unpacked ``batch_first``
  input: a copy only when that is not already contiguous (a batch of more than one, or a
  transposed ``[B, T, C]`` view such as Kokoro's ``x.transpose(-1, -2)``); freed on return.
- ``output``: ``[sum(batch_sizes), D * H_out]`` for packed input, else ``[T, B, D * H_out]``, in
  the input's dtype, handed back as ``transpose(0, 1)`` (a view: the strides are the card's) for
  ``batch_first``. ``H_out`` is ``proj_size`` when set, else ``hidden_size``; ``D`` is 2 when
  bidirectional.
- ``hy`` ``[D * num_layers, B, H_out]`` in ``h_0``'s dtype and, for the LSTM, ``cy``
  ``[D * num_layers, B, hidden_size]`` in ``c_0``'s. (For GRU / RNN, cuDNN returns ``cy`` and the
  reserve as ``at::empty({0})``: zero bytes, no block from the caching allocator, so not made.)
- a weight buffer, only with ``cudnn_rnn(flat_weights=False)``: ``_cudnn_impl`` passes cuDNN the
  parameters' own storage when ``try_get_weight_buf`` finds them laid out as one cuDNN weight
  space, which ``RNNBase.flatten_parameters()`` arranges whenever the module is moved to CUDA
  (``_apply`` → ``_init_flat_weights``), so normally there is none. Otherwise ``_cudnn_rnn`` warns
  and copies them into a fresh ``cudnnGetRNNWeightSpaceSize`` buffer for the call: per layer and
  direction ``G*H*I + G*H*H_out + 2*G*H`` (+ ``H_out*H`` for a projection) elements, ``G`` the
  gates (LSTM 4, GRU 3, RNN 1), ``I`` the layer's input width; bias slots are there even for
  ``bias=False``, as PyTorch's descriptor always asks for ``CUDNN_RNN_DOUBLE_BIAS``. Freed when
  ``_cudnn_impl`` drops ``_cudnn_rnn``'s fifth output.
- the workspace, ``at::empty(workspace_size, kByte)``, freed on return (see below).

The workspace size comes from ``cudnnGetRNNTempSpaceSizes`` (``cudnnGetRNNWorkspaceSize`` before
the v8 API), which cuDNN does not document as a formula: only that it depends on the network
geometry in the RNN descriptor and on the RNN data's ``maxSeqLength`` and ``batchSize`` (for a
packed input, the longest sequence and ``batch_sizes[0]``, not the packed row count), and that it
is not monotonic in them. It cannot be known without cuDNN, so this module uses an upper-bound
estimate from what cuDNN's standard algorithm is documented to keep (NVIDIA, "Optimizing Recurrent
Neural Networks in cuDNN 5"): it computes the input GEMMs of all time steps at once and overlaps
layers, and in inference there is no reserve space to hold those intermediates, so the workspace
holds them. Counting none as reused across layers::

    workspace = T * B * D * (num_layers * G * H * math_size + (num_layers - 1) * H_out * size)

the gate pre-activations of every step, layer and direction in the math type (``math_size``: fp32,
4 bytes, for fp16 / bf16 / fp32 alike, as ``promote_rnn_math_type`` computes half in float; 8 for
fp64), plus every layer's output but the last in the data type (``size``). It is an estimate, not
cuDNN's number: the real one may be smaller. For a one-layer bidirectional LSTM of hidden size 256
(Kokoro's) it is 8 KiB per time step and sequence.

The algorithm (counted, see below) is PyTorch's ``get_algo`` for an sm_86 card with 28 SMs: the
persistent small-H kernel for an unpacked, non-fp64 input without a projection whose hidden size is
at most 192 (LSTM, GRU) or 384 (RNN), else the standard one; ``PERSIST_STATIC`` needs 98 SMs and
excludes sm_86. Its workspace is estimated by the same formula.

Calls left to PyTorch (its decomposition on meta, which is also wrong for the card, but not
modelled here): any tensor not on meta; autograd recording (grad enabled and something requiring
grad: the card's reserve space and backward are not modelled); ``train=True`` (module in training
mode: reserve space, dropout state); a dtype cuDNN has no type for, an empty input, or mixed
dtypes, which PyTorch rejects or runs natively on the card too.

``nn.LSTM.forward`` calls ``torch._VF.lstm`` (the same object as ``torch.lstm``) with the
``_flat_weights`` list, after building ``h_0``/``c_0`` and unpacking a ``PackedSequence``; the
function mode sees that call, with either overload (``input, hx, params, ...batch_first`` or
``data, batch_sizes, hx, params, ...``), so nothing is patched and the mode is per thread, as
PyTorch's mode stack is. ``CardRNN.kernels`` counts the path each call took.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CardRNN", "cudnn_rnn", "workspace_bytes"]

# name, gates per cell, largest hidden size for the persistent small-H forward kernel
_RNNS = {
    torch._VF.lstm: ("lstm", 4, 192),
    torch._VF.gru: ("gru", 3, 192),
    torch._VF.rnn_tanh: ("rnn_tanh", 1, 384),
    torch._VF.rnn_relu: ("rnn_relu", 1, 384),
}
_CUDNN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CardRNN(TorchFunctionMode):
    """Routes meta RNN calls to what cuDNN allocates on an RTX 3060; ``kernels`` counts them."""

    def __init__(self, *, flat_weights: bool = True) -> None:
        super().__init__()
        self.flat_weights = flat_weights
        self.kernels: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rnn = _RNNS.get(func)
        if rnn is not None:
            kernel, out = _route(rnn, args, kwargs, self.flat_weights)
            self.kernels[kernel] += 1
            if out is not None:
                return out
        return func(*args, **kwargs)


def cudnn_rnn(*, flat_weights: bool = True) -> CardRNN:
    """A context manager under which meta RNN calls allocate as cuDNN does (see the module).

    ``flat_weights=False`` models a module whose weights are not one cuDNN weight space on the
    card (assigned after ``.to("cuda")`` without ``flatten_parameters()``): a copy per call.
    """
    return CardRNN(flat_weights=flat_weights)


@dataclass(frozen=True)
class _Call:
    input: torch.Tensor
    batch_sizes: torch.Tensor | None
    hx: tuple[torch.Tensor, ...]
    params: tuple[torch.Tensor, ...]
    has_biases: bool
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool


def _padded(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
            batch_first) -> _Call:
    hx = tuple(hx) if isinstance(hx, list | tuple) else (hx,)
    return _Call(input, None, hx, tuple(params), has_biases, num_layers, dropout, train,
                 bidirectional, batch_first)


def _packed(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
            bidirectional) -> _Call:
    hx = tuple(hx) if isinstance(hx, list | tuple) else (hx,)
    return _Call(data, batch_sizes, hx, tuple(params), has_biases, num_layers, dropout, train,
                 bidirectional, False)


def _bind(lstm: bool, args: tuple, kwargs: dict) -> _Call:
    # Both overloads take nine arguments; they differ in what follows the input: the LSTM's
    # hidden state is a tuple where the packed overload has batch_sizes, and the GRU's / RNN's
    # params list is where the packed overload has the hidden tensor.
    probe = 1 if lstm else 2
    packed = "batch_sizes" in kwargs or (
        len(args) > probe and isinstance(args[probe], torch.Tensor)
    )
    return (_packed if packed else _padded)(*args, **kwargs)


def _route(rnn: tuple[str, int, int], args: tuple, kwargs: dict,
           flat_weights: bool) -> tuple[str, tuple[torch.Tensor, ...] | None]:
    """The path's name and the op's outputs, or ``(reason, None)`` to leave the call to PyTorch."""
    name, gates, small_h = rnn
    call = _bind(name == "lstm", args, kwargs)
    tensors = (call.input, *call.hx, *call.params)
    if not all(t.device.type == "meta" for t in tensors):
        return "not-meta", None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "autograd", None
    if call.train:
        return "training", None
    dtype = call.input.dtype
    if dtype not in _CUDNN_DTYPES or call.input.numel() == 0:
        return "native", None
    if any(t.dtype != dtype for t in tensors):
        return "native", None
    if len(call.hx) != (2 if name == "lstm" else 1):
        return "native", None
    return _cudnn(call, name, gates, small_h, flat_weights)


def _geometry(call: _Call) -> tuple[int, int, int, int]:
    """Hidden size, projection size (0 for none), max sequence length and batch, as cuDNN sees."""
    h0 = call.hx[0]
    hidden, proj = h0.size(2), 0
    # _cudnn_impl's test for an LSTM with a projection: h and c of different widths
    if len(call.hx) == 2 and call.hx[1].size(2) != hidden:
        hidden, proj = call.hx[1].size(2), hidden
    if call.batch_sizes is not None:
        seq, batch = call.batch_sizes.size(0), int(call.batch_sizes[0])
    elif call.batch_first:
        batch, seq = call.input.size(0), call.input.size(1)
    else:
        seq, batch = call.input.size(0), call.input.size(1)
    return hidden, proj, seq, batch


def workspace_bytes(*, gates: int, hidden_size: int, proj_size: int, num_layers: int,
                    bidirectional: bool, seq_length: int, batch: int,
                    dtype: torch.dtype) -> int:
    """The module's upper-bound estimate of cuDNN's inference workspace, in bytes."""
    math_size = 8 if dtype == torch.float64 else 4
    size = dtype.itemsize
    h_out = proj_size or hidden_size
    per_step = (num_layers * gates * hidden_size * math_size
                + (num_layers - 1) * h_out * size)
    return seq_length * batch * (2 if bidirectional else 1) * per_step


def _weight_space(call: _Call, gates: int, hidden: int, proj: int) -> int:
    directions = 2 if call.bidirectional else 1
    h_out = proj or hidden
    total = 0
    for layer in range(call.num_layers):
        width = call.input.size(-1) if layer == 0 else directions * h_out
        per_direction = gates * hidden * (width + h_out + 2) + (h_out * hidden if proj else 0)
        total += directions * per_direction
    return total


def _cudnn(call: _Call, name: str, gates: int, small_h: int,
           flat_weights: bool) -> tuple[str, tuple[torch.Tensor, ...]]:
    hidden, proj, seq, batch = _geometry(call)
    packed = call.batch_sizes is not None
    directions = 2 if call.bidirectional else 1
    h_out = proj or hidden
    persist = (not packed and not proj and call.input.dtype != torch.float64
               and hidden <= small_h)
    algo = "persist-small-h" if persist else "standard"
    device, dtype = call.input.device, call.input.dtype

    x = call.input.transpose(0, 1) if call.batch_first and not packed else call.input
    x = x.contiguous()
    if packed:
        out_shape: tuple[int, ...] = (call.input.size(0), directions * h_out)
    else:
        out_shape = (seq, batch, directions * h_out)
    output = torch.empty(out_shape, dtype=dtype, device=device)
    h0 = call.hx[0]
    hy = torch.empty((directions * call.num_layers, batch, h_out), dtype=h0.dtype, device=device)
    outs: tuple[torch.Tensor, ...] = (output, hy)
    if name == "lstm":
        c0 = call.hx[1]
        cy = torch.empty((directions * call.num_layers, batch, hidden), dtype=c0.dtype,
                         device=device)
        outs = (output, hy, cy)
    weight_buf = None
    if not flat_weights:
        weight_buf = torch.empty(_weight_space(call, gates, hidden, proj), dtype=dtype,
                                 device=device)
    nbytes = workspace_bytes(
        gates=gates, hidden_size=hidden, proj_size=proj, num_layers=call.num_layers,
        bidirectional=call.bidirectional, seq_length=seq, batch=batch, dtype=dtype,
    )
    # The caching allocator makes no block for zero bytes, so neither does this.
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
    # _cudnn_rnn's locals go at its return (workspace, then the input copy); the weight copy,
    # its fifth output, when _cudnn_impl drops the tuple.
    del workspace, x, weight_buf
    if call.batch_first and not packed:
        outs = (output.transpose(0, 1), *outs[1:])
    return f"{name}-{algo}", outs
