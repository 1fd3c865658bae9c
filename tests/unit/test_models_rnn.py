"""app.backends.kernels.rnn: meta RNN calls return what the un-routed meta forward returns
(shapes, dtypes)
while allocating what cuDNN's ``_cudnn_rnn`` allocates on the card: a handful of storages a call,
not a few per time step, and a workspace that is gone when the call returns."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from app.backends.kernels.rnn import cudnn_rnn, workspace_bytes
from tests.meta_storages import NewStorages


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in tensors(part)]


T, B, C, H = 12, 3, 8, 16  # time steps, batch, input channels, hidden size


def meta_rnn(cls=nn.LSTM, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(C, H, **kwargs).eval()


def inputs(batch_first: bool, packed: bool, dtype=torch.float32):
    if packed:
        # the longest first, as pack_padded_sequence wants without enforce_sorted=False
        padded = torch.empty(T, B, C, device="meta", dtype=dtype)
        return pack_padded_sequence(padded, torch.tensor([T, T - 4, 2]))
    shape = (B, T, C) if batch_first else (T, B, C)
    return torch.empty(shape, device="meta", dtype=dtype)


CASES = [
    pytest.param(dict(), False, False, id="uni"),
    pytest.param(dict(bidirectional=True), False, False, id="bi"),
    pytest.param(dict(batch_first=True), True, False, id="uni-batch-first"),
    pytest.param(dict(bidirectional=True, batch_first=True), True, False, id="bi-batch-first"),
    pytest.param(dict(bidirectional=True), False, True, id="bi-packed"),
    pytest.param(dict(num_layers=2), False, False, id="two-layers"),
    pytest.param(dict(num_layers=2, bidirectional=True, batch_first=True), True, False,
                 id="two-layers-bi-batch-first"),
    pytest.param(dict(num_layers=2, bidirectional=True), False, True, id="two-layers-bi-packed"),
    pytest.param(dict(proj_size=5, bidirectional=True), False, False, id="projection"),
]


@pytest.mark.parametrize(("kwargs", "batch_first", "packed"), CASES)
def test_lstm_outputs_match_the_meta_forward_with_a_handful_of_storages(kwargs, batch_first,
                                                                        packed):
    lstm = meta_rnn(**kwargs)
    x = inputs(batch_first, packed)
    with torch.no_grad():
        with NewStorages() as plain:
            expected = lstm(x)
        with NewStorages() as routed, cudnn_rnn() as rnn:
            got = lstm(x)
    assert type(got[0]) is type(expected[0])
    assert [(t.shape, t.dtype) for t in tensors(got)] == [
        (t.shape, t.dtype) for t in tensors(expected)
    ]
    assert sum(rnn.kernels.values()) == 1 and "native" not in rnn.kernels
    # h_0 and c_0 (nn.LSTM's zeros), then the input copy, output, h_n, c_n and the workspace
    assert len(routed.sizes) <= 7
    assert len(plain.sizes) > 3 * T
    # all that is left is what the call returned (plus h_0 and c_0, gone with the frame)
    returned = sum(t.untyped_storage().nbytes() for t in tensors(got))
    assert routed.live == returned


def test_allocations_are_cudnns_in_order_with_the_workspace_freed():
    lstm = meta_rnn(bidirectional=True, batch_first=True)
    x = torch.empty(B, T, C, device="meta")
    h0 = torch.zeros(2, B, H, device="meta")
    c0 = torch.zeros(2, B, H, device="meta")
    with torch.no_grad(), NewStorages() as track, cudnn_rnn() as rnn:
        out, hidden = lstm(x, (h0, c0))
    # H <= 192 unpacked: the persistent small-H kernel PyTorch's get_algo picks on sm_86
    assert rnn.kernels == {"lstm-persist-small-h": 1}
    workspace = T * B * 2 * 4 * H * 4  # steps x batch x directions x gates x H x fp32
    assert workspace == workspace_bytes(gates=4, hidden_size=H, proj_size=0, num_layers=1,
                                        bidirectional=True, seq_length=T, batch=B,
                                        dtype=torch.float32)
    # the seq-major copy of a batch-first input, y, hy, cy, the workspace
    assert track.sizes == [T * B * C * 4, T * B * 2 * H * 4, 2 * B * H * 4, 2 * B * H * 4,
                           workspace]
    assert track.peak == sum(track.sizes)
    # y, h_n and c_n outlive the call, with the input copy and the workspace gone
    assert [t.untyped_storage().nbytes() for t in (out, *hidden)] == track.sizes[1:4]
    assert track.live == sum(track.sizes[1:4])
    # y is made seq-major and handed back transposed, as _cudnn_rnn does
    assert out.shape == (B, T, 2 * H) and out.stride() == (2 * H, B * 2 * H, 1)


def test_a_packed_workspace_is_sized_by_the_longest_sequence_and_the_first_batch():
    lstm = meta_rnn(num_layers=2, bidirectional=True)
    x = inputs(batch_first=False, packed=True)
    with torch.no_grad(), NewStorages() as track, cudnn_rnn() as rnn:
        out, _ = lstm(x)
    assert rnn.kernels == {"lstm-standard": 1}  # persistent kernels refuse packed input
    rows = T + (T - 4) + 2
    assert out.data.shape == (rows, 2 * H)
    # two layers: every layer's gate pre-activations, and the first layer's output
    per_step = 2 * 4 * H * 4 + 1 * H * 4
    assert track.sizes[-1] == T * B * 2 * per_step


def test_weights_not_in_one_chunk_are_copied_for_the_call():
    lstm = meta_rnn(num_layers=2)
    x = inputs(batch_first=False, packed=False)
    params = sum(p.numel() for p in lstm.parameters()) * 4
    with torch.no_grad(), NewStorages() as track, cudnn_rnn(flat_weights=False):
        result = lstm(x)
    assert params in track.sizes  # bias=True: cuDNN's weight space is the parameters' size
    assert track.live == sum(t.untyped_storage().nbytes() for t in tensors(result))


@pytest.mark.parametrize("cls", [nn.GRU, nn.RNN])
@pytest.mark.parametrize("packed", [False, True])
def test_gru_and_rnn_return_one_hidden_state(cls, packed):
    rnn_module = meta_rnn(cls, num_layers=2, bidirectional=True)
    x = inputs(batch_first=False, packed=packed)
    with torch.no_grad():
        expected = rnn_module(x)
        with NewStorages() as track, cudnn_rnn() as rnn:
            got = rnn_module(x)
    assert [(t.shape, t.dtype) for t in tensors(got)] == [
        (t.shape, t.dtype) for t in tensors(expected)
    ]
    assert len(rnn.kernels) == 1 and next(iter(rnn.kernels)).startswith(cls.__name__.lower())
    assert len(track.sizes) <= 4  # h_0, output, h_n, the workspace


def test_half_outputs_stay_half():
    with torch.device("meta"):
        lstm = nn.LSTM(C, H, bidirectional=True).half().eval()
    x = torch.empty(T, B, C, device="meta", dtype=torch.float16)
    with torch.no_grad(), cudnn_rnn():
        out, (hn, cn) = lstm(x)
    assert {out.dtype, hn.dtype, cn.dtype} == {torch.float16}


def test_calls_it_does_not_model_are_left_to_pytorch():
    x = inputs(batch_first=False, packed=False)
    with cudnn_rnn() as rnn:
        meta_rnn().requires_grad_(True)(x)  # autograd
        with torch.no_grad():
            meta_rnn().train()(x)
            nn.LSTM(C, H)(torch.zeros(T, B, C))
    assert rnn.kernels == {"autograd": 1, "training": 1, "not-meta": 1}


def test_kokoro_speaks_the_same_audio_with_storages_that_do_not_grow_with_its_length():
    pytest.importorskip("kokoro")
    from app.models import kokoro as kk

    model = kk.build()
    with NewStorages() as routed:
        audio = kk.speak(model, seconds=5)
    # speak as it was: every LSTM decomposed per time step on meta
    with mock.patch.object(kk, "cudnn_rnn", contextlib.nullcontext), NewStorages() as plain:
        expected = kk.speak(model, seconds=5)
    assert audio.shape == expected.shape == (5 * kk.SAMPLE_RATE,)
    assert audio.dtype == expected.dtype
    assert 3 * len(routed.sizes) < len(plain.sizes)
    with NewStorages() as longer:
        kk.speak(model, seconds=8)
    assert len(longer.sizes) == len(routed.sizes)
