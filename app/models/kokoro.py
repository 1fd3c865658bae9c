"""Kokoro-82M on the meta device, built from the ``kokoro`` package's own modules.

What it holds: :func:`build` makes a real ``kokoro.model.KModel`` without running its
``__init__`` (which always downloads ``config.json`` and the weights from the Hub and loads a
state dict): it calls ``nn.Module.__init__`` and then wires the same submodules, from the same
classes, with the same arguments as ``KModel.__init__`` does (``kokoro/model.py``, kokoro 0.9.4),
from the published hexgrad/Kokoro-82M ``config.json`` written out below. The weights stay
uninitialised on meta. :func:`speak` runs ``KModel.forward_with_tokens`` line for line
(``_forward_with_tokens`` below) with the durations fixed on the CPU.

What it assumes:

* dtype fp32: KModel has no dtype option and the kokoro pipeline runs it in fp32.
* ``vocab`` is a placeholder: nothing is phonemised here, the token ids are meta tensors.
* the decoder keeps ``disable_complex=False``, the ``TorchSTFT`` the GPU runs (``CustomSTFT`` is
  for ONNX export). Its ``torch.stft`` and complex arithmetic run on meta; ``torch.istft`` does
  not (it calls ``aten::equal``, which has no meta kernel), so on meta only, the decoder's STFT
  calls ``torch._refs.istft``, PyTorch's own decomposition of istft (irfft, window, overlap-add
  by ``unfold_backward``, division by the window envelope): same output, about the same
  temporaries as the native kernel.
* memory beside the state dict: kokoro uses the legacy ``torch.nn.utils.weight_norm``, which
  computes each of its 89 convolutions' ``weight`` from ``weight_g``/``weight_v`` at construction
  and again before every forward, and keeps it as a plain attribute: 230,545,200 bytes (fp32)
  that ``parameters()``/``buffers()`` do not list. Built on meta they exist from the build; a
  real ``KModel(...).to("cuda")`` moves only parameters and buffers, so on the card they appear
  at the first forward and stay.
* the LSTMs (the text encoder's, the predictor's DurationEncoder, ``lstm`` and ``shared``, all
  one-layer bidirectional, hidden 256; ``shared`` runs over the alignment frames, the others over
  the tokens, packed or not): on meta ``nn.LSTM`` has no fused kernel and PyTorch decomposes it
  per time step, thousands of storages a call and most of the forward's time, where the card runs
  one cuDNN call. :func:`speak` runs under :func:`app.backends.kernels.rnn.cudnn_rnn`, so each
  LSTM makes what ``_cudnn_rnn`` makes on the card instead: the output, ``h_n``, ``c_n``, the
  input copy cuDNN makes of a transposed input, and a transient workspace whose size is an
  upper-bound estimate (cuDNN does not publish its formula; see that module). The weights are
  taken to be one cuDNN weight space, as ``flatten_parameters()`` makes them when the model is
  moved to CUDA.
* audio timing, from the networks: one alignment frame is 600 samples at 24 kHz (the predictor's
  F0/N and the decoder's last block upsample 2x, the generator 10x6, the iSTFT hop is 5), so
  40 frames/s. Text is ``PHONEMES_PER_SECOND`` phonemes a second (conversational English is
  12-15), plus the two pad tokens KModel.forward adds, and at most ``context_length`` (512)
  tokens per call: :data:`MAX_SECONDS` of audio. For longer audio the Director chunks the text
  (as KPipeline does at 510 phonemes) and calls once per chunk.

Where ``_forward_with_tokens`` differs from ``KModel.forward_with_tokens``, and why:

1. ``input_lengths`` is made on the CPU, not on ``input_ids.device``: the text encoders hand it to
   ``pack_padded_sequence``, which moves it to the CPU anyway, and a meta tensor cannot be
   copied out. ``text_mask`` is computed from it and moved to the device, as upstream does.
2. ``self.bert(input_ids, attention_mask=None)`` instead of the all-ones mask: transformers
   drops an all-ones mask for SDPA after reading its values (``padding_mask.all()``), which meta
   cannot; ``None`` is what it arrives at for Kokoro's single unpadded sequence.
3. ``pred_dur`` is given instead of ``torch.round(duration).clamp(min=1)``: the predictor's LSTM,
   projection and sigmoid-sum still run on meta, but their values do not exist there. The
   ``repeat_interleave`` of token indices runs on the CPU on those given durations (its output
   length is data-dependent), and its result is moved to the device; ``pred_aln_trg`` is then
   built on the device as upstream builds it.
4. ``pad_packed_sequence`` is swapped, for the call and for meta tensors only, for one that
   skips ``lengths[unsorted_indices.cpu()]`` (a copy out of a meta tensor); for Kokoro's batch
   of one sequence that indexing is the identity.
The ALBERT forward runs under :func:`app.backends.kernels.attention.flash_attention`, so its SDPA
takes the kernel an RTX 3060 would (for fp32, the memory-efficient one); the whole forward runs
under :func:`app.backends.kernels.rnn.cudnn_rnn`, so its LSTMs allocate as cuDNN does on that
card.
"""

from __future__ import annotations

import math
import warnings
from unittest import mock

import torch
from kokoro.istftnet import Decoder, TorchSTFT
from kokoro.model import KModel
from kokoro.modules import CustomAlbert, ProsodyPredictor, TextEncoder
from torch import nn
from transformers import AlbertConfig

from app.backends.kernels.attention import flash_attention
from app.backends.kernels.rnn import cudnn_rnn

# hexgrad/Kokoro-82M config.json, without its 178-entry phoneme vocab
CONFIG: dict = {
    "n_token": 178,
    "hidden_dim": 512,
    "style_dim": 128,
    "n_layer": 3,
    "max_dur": 50,
    "dropout": 0.2,
    "text_encoder_kernel_size": 5,
    "n_mels": 80,
    "plbert": {
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
        "max_position_embeddings": 512,
        "num_hidden_layers": 12,
        "dropout": 0.1,
    },
    "istftnet": {
        "upsample_kernel_sizes": [20, 12],
        "upsample_rates": [10, 6],
        "gen_istft_hop_size": 5,
        "gen_istft_n_fft": 20,
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "resblock_kernel_sizes": [3, 7, 11],
        "upsample_initial_channel": 512,
    },
    "vocab": {"$": 0},  # placeholder: no text is phonemised on meta
}

SAMPLE_RATE = 24_000
# x2 in F0Ntrain / the decoder's last block, x10 x6 in the generator, iSTFT hop 5
SAMPLES_PER_FRAME = (
    2 * math.prod(CONFIG["istftnet"]["upsample_rates"]) * CONFIG["istftnet"]["gen_istft_hop_size"]
)
FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME  # 40.0
PHONEMES_PER_SECOND = 13.0
CONTEXT_LENGTH = CONFIG["plbert"]["max_position_embeddings"]  # 512 tokens, the 2 pads included
MAX_SECONDS = (CONTEXT_LENGTH - 2) / PHONEMES_PER_SECOND  # ~39.2 s


class _MetaTorchSTFT(TorchSTFT):
    """TorchSTFT whose inverse uses PyTorch's istft decomposition for meta tensors only."""

    def inverse(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        if not magnitude.is_meta:
            return super().inverse(magnitude, phase)
        out = torch._refs.istft(
            magnitude * torch.exp(phase * 1j),
            self.filter_length,
            self.hop_length,
            self.win_length,
            window=self.window.to(magnitude.device),
        )
        return out.unsqueeze(-2)


def build() -> KModel:
    """A KModel for Kokoro-82M on meta, fp32, eval mode, wired as ``KModel.__init__`` wires it."""
    config = CONFIG
    with warnings.catch_warnings():
        # kokoro passes dropout to single-layer LSTMs (DurationEncoder) and uses the deprecated
        # torch.nn.utils.weight_norm; both warn at construction and neither changes inference
        warnings.filterwarnings(
            "ignore", message="dropout option adds dropout after all but last recurrent layer",
            category=UserWarning,
        )
        warnings.filterwarnings(
            "ignore", message=r"`torch.nn.utils.weight_norm` is deprecated",
            category=FutureWarning,
        )
        model = KModel.__new__(KModel)
        nn.Module.__init__(model)
        with torch.device("meta"):
            model.repo_id = "hexgrad/Kokoro-82M"
            model.vocab = config["vocab"]
            albert = AlbertConfig(vocab_size=config["n_token"], **config["plbert"])
            model.bert = CustomAlbert(albert)
            model.bert_encoder = nn.Linear(model.bert.config.hidden_size, config["hidden_dim"])
            model.context_length = model.bert.config.max_position_embeddings
            model.predictor = ProsodyPredictor(
                style_dim=config["style_dim"], d_hid=config["hidden_dim"],
                nlayers=config["n_layer"], max_dur=config["max_dur"], dropout=config["dropout"],
            )
            model.text_encoder = TextEncoder(
                channels=config["hidden_dim"], kernel_size=config["text_encoder_kernel_size"],
                depth=config["n_layer"], n_symbols=config["n_token"],
            )
            model.decoder = Decoder(
                dim_in=config["hidden_dim"], style_dim=config["style_dim"],
                dim_out=config["n_mels"], disable_complex=False, **config["istftnet"],
            )
    model.decoder.generator.stft.__class__ = _MetaTorchSTFT
    return model.eval().requires_grad_(False)


def _pad_packed_sequence(sequence, batch_first=False, padding_value=0.0, total_length=None):
    if not sequence.data.is_meta:
        return _PAD_PACKED(sequence, batch_first, padding_value, total_length)
    if int(sequence.batch_sizes[0]) != 1:
        raise NotImplementedError("meta pad_packed_sequence handles one sequence only")
    max_len = sequence.batch_sizes.size(0) if total_length is None else total_length
    padded, lengths = torch._VF._pad_packed_sequence(
        sequence.data, sequence.batch_sizes, batch_first, padding_value, max_len
    )
    if sequence.unsorted_indices is not None:
        padded = padded.index_select(0 if batch_first else 1, sequence.unsorted_indices)
    return padded, lengths


_PAD_PACKED = torch.nn.utils.rnn.pad_packed_sequence


@torch.no_grad()
def _forward_with_tokens(
    self: KModel, input_ids: torch.Tensor, ref_s: torch.Tensor, pred_dur: torch.Tensor,
    speed: float = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KModel.forward_with_tokens with the durations given (see the module docstring, 1-4)."""
    input_lengths = torch.full((input_ids.shape[0],), input_ids.shape[-1], dtype=torch.long)  # 1
    text_mask = torch.arange(input_lengths.max()).unsqueeze(0).expand(input_lengths.shape[0], -1).type_as(input_lengths)  # noqa: E501
    text_mask = torch.gt(text_mask+1, input_lengths.unsqueeze(1)).to(self.device)
    with flash_attention():
        bert_dur = self.bert(input_ids, attention_mask=None)  # 2
    d_en = self.bert_encoder(bert_dur).transpose(-1, -2)
    s = ref_s[:, 128:]
    d = self.predictor.text_encoder(d_en, s, input_lengths, text_mask)
    x, _ = self.predictor.lstm(d)
    duration = self.predictor.duration_proj(x)
    duration = torch.sigmoid(duration).sum(axis=-1) / speed
    del duration  # 3: its values are replaced by pred_dur
    indices = torch.repeat_interleave(torch.arange(input_ids.shape[1]), pred_dur).to(self.device)
    pred_aln_trg = torch.zeros((input_ids.shape[1], indices.shape[0]), device=self.device)
    pred_aln_trg[indices, torch.arange(indices.shape[0])] = 1
    pred_aln_trg = pred_aln_trg.unsqueeze(0).to(self.device)
    en = d.transpose(-1, -2) @ pred_aln_trg
    F0_pred, N_pred = self.predictor.F0Ntrain(en, s)
    t_en = self.text_encoder(input_ids, input_lengths, text_mask)
    asr = t_en @ pred_aln_trg
    audio = self.decoder(asr, F0_pred, N_pred, ref_s[:, :128]).squeeze()
    return audio, pred_dur


def plan(seconds: float) -> tuple[int, torch.Tensor]:
    """Tokens (pads included) and the per-token durations, in frames, for ``seconds`` of audio."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"seconds must be a number, got {seconds!r}")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(
            f"seconds must be in (0, {MAX_SECONDS:.2f}] (one call is at most {CONTEXT_LENGTH} "
            f"tokens; longer text is chunked), got {seconds!r}"
        )
    frames = round(seconds * FRAMES_PER_SECOND)
    tokens = max(1, round(seconds * PHONEMES_PER_SECOND)) + 2
    if frames < tokens:
        raise ValueError(f"{seconds!r} s is too short for one phoneme between the two pads")
    base, extra = divmod(frames, tokens)
    pred_dur = torch.full((tokens,), base, dtype=torch.long)
    pred_dur[:extra] += 1
    return tokens, pred_dur


def speak(model: KModel, *, seconds: float = 5.0) -> torch.Tensor:
    """``seconds`` of 24 kHz audio from one chunk of text: a 1-D meta tensor, 600 per frame."""
    tokens, pred_dur = plan(seconds)
    input_ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
    ref_s = torch.empty(1, 256, device=model.device)  # a voice pack's style row
    with (
        mock.patch.object(torch.nn.utils.rnn, "pad_packed_sequence", _pad_packed_sequence),
        cudnn_rnn(),
    ):
        audio, _ = _forward_with_tokens(model, input_ids, ref_s, pred_dur)
    return audio
