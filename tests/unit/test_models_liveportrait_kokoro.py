"""LivePortrait and Kokoro-82M on meta: sizes against the published checkpoints, forward shapes,
argument checks, and what a forward allocates (new storages, tracked by a dispatch mode)."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

pytest.importorskip("kokoro")

from app.models import kokoro as kk
from app.models import liveportrait as lp
from tests.meta_storages import NewStorages

NETWORKS = (
    "appearance_feature_extractor",
    "motion_extractor",
    "warping_module",
    "spade_generator",
    "stitching_retargeting_module",
)


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the unique storages behind the parameters and buffers (shared ones once)."""
    storages = {}
    for t in (*module.parameters(), *module.buffers()):
        s = t.untyped_storage()
        # meta storages all have data_ptr 0: the StorageImpl pointer tells them apart
        storages[s._cdata] = s.nbytes()
    return sum(storages.values())


def state_bytes(module: torch.nn.Module, float_size: int) -> int:
    """The bytes of ``module``'s state dict with floats at ``float_size`` bytes each."""
    return sum(
        t.numel() * (float_size if t.is_floating_point() else t.element_size())
        for t in module.state_dict().values()
    )


def derived_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights that weight-norm / spectral-norm hooks hold outside the state.

    Both legacy hooks (``torch.nn.utils.weight_norm``, ``spectral_norm``) recompute ``weight``
    before every forward and leave it on the module as a plain attribute: device memory that
    ``parameters()`` and ``buffers()`` do not show.
    """
    state = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())}
    derived = {}
    for mod in module.modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm | SpectralNorm):
                storage = getattr(mod, hook.name).untyped_storage()
                if storage._cdata not in state:
                    derived[storage._cdata] = storage.nbytes()
    return sum(derived.values())


@pytest.fixture(scope="module")
def portrait() -> lp.LivePortrait:
    return lp.build()


@pytest.fixture(scope="module")
def kokoro() -> torch.nn.Module:
    return kk.build()


# ---- sizes --------------------------------------------------------------------------------------

# Parameter counts that the published layer definitions and models.yaml give, and the sizes of
# the fp32 checkpoints on the Hub (KwaiVGI/LivePortrait, liveportrait/base_models/), quoted to two
# or three significant figures: 3.3, 112, 182, 222 MB. A checkpoint holds the state dict (params
# and BatchNorm / spectral-norm buffers) plus pickle overhead of a few hundred bytes a tensor, so
# the state's bytes must come within the quoting's rounding: 2 %.
PUBLISHED = {
    "appearance_feature_extractor": (836_224, 3.3e6),
    "motion_extractor": (28_118_728, 112e6),
    "warping_module": (45_529_829, 182e6),
    "spade_generator": (55_365_388, 222e6),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_liveportrait_networks_match_the_published_checkpoints(portrait, name):
    net = getattr(portrait, name)
    params, checkpoint_bytes = PUBLISHED[name]
    assert sum(p.numel() for p in net.parameters()) == params
    assert state_bytes(net, 4) == pytest.approx(checkpoint_bytes, rel=0.02)


def test_stitching_and_retargeting_mlps_are_models_yaml_s():
    # stitching 126-128-128-64-65, lip 65-128-128-64-63, eye 66-256-256-128-128-64-63
    def mlp(*sizes: int) -> int:
        return sum(a * b + b for a, b in itertools.pairwise(sizes))

    model = lp.build()
    mlps = model.stitching_retargeting_module
    assert sum(p.numel() for p in mlps["stitching"].parameters()) == mlp(126, 128, 128, 64, 65)
    assert sum(p.numel() for p in mlps["lip"].parameters()) == mlp(65, 128, 128, 64, 63)
    assert sum(p.numel() for p in mlps["eye"].parameters()) == mlp(66, 256, 256, 128, 128, 64, 63)


def test_liveportrait_is_resident_in_fp16_on_meta(portrait):
    params = list(portrait.parameters())
    buffers = list(portrait.buffers())
    assert all(t.is_meta for t in (*params, *buffers))
    assert {p.dtype for p in params} == {torch.float16}
    param_bytes = 2 * sum(p.numel() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    assert resident_bytes(portrait) == param_bytes + buffer_bytes
    assert resident_bytes(portrait) == sum(resident_bytes(getattr(portrait, n)) for n in NETWORKS)
    assert 0.25e9 < param_bytes < 0.27e9  # 130.08M parameters


def test_kokoro_is_82m_parameters_resident_in_fp32_on_meta(kokoro):
    from kokoro.model import KModel

    assert isinstance(kokoro, KModel)
    params = list(kokoro.parameters())
    n = sum(p.numel() for p in params)
    # the model card's "82M"; kokoro-v1_0.pth is 327 MB of fp32
    assert n == pytest.approx(81.8e6, rel=0.001)
    assert 4 * n == pytest.approx(327e6, rel=0.005)
    assert all(p.is_meta and p.dtype == torch.float32 for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in kokoro.buffers())
    assert resident_bytes(kokoro) == 4 * n + buffer_bytes


def test_liveportrait_holds_spectral_norm_weights_once_it_has_run():
    model = lp.build()
    sn = [m for m in model.modules() if hasattr(m, "weight_orig")]
    assert len(sn) == 18  # conv_0 and conv_1 of G's 8 SPADE blocks, conv_s of the 2 that narrow
    assert derived_weight_bytes(model) == 0  # until a forward, weight is weight_orig's data
    lp.animate(model, frames=1)
    assert derived_weight_bytes(model) == 2 * sum(m.weight_orig.numel() for m in sn)


def test_kokoro_holds_its_weight_norm_weights_from_the_build(kokoro):
    wn = [m for m in kokoro.modules() if hasattr(m, "weight_g")]
    expected = 4 * sum(m.weight_v.numel() for m in wn)
    assert derived_weight_bytes(kokoro) == expected  # ~0.23 GB beside the 0.33 GB of state
    with NewStorages() as track:
        audio = kk.speak(kokoro, seconds=0.5)
    del audio
    # each forward replaces them, it does not add to them
    assert derived_weight_bytes(kokoro) == expected
    assert track.live == expected


# ---- forwards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 3])
def test_animate_returns_the_frames_at_512(portrait, frames):
    out = lp.animate(portrait, frames=frames)
    assert out.is_meta
    assert out.shape == (frames, 3, 512, 512)
    assert out.dtype == torch.float32  # warp_decode floats its output, as upstream


def test_animate_allocates_per_frame_and_leaves_the_weights_alone(portrait):
    lp.animate(portrait, frames=1)  # spectral norm's first recomputation of its weights
    before = resident_bytes(portrait)
    peaks = []
    for frames in (1, 4):
        with NewStorages() as track:
            out = lp.animate(portrait, frames=frames)
        peaks.append(track.peak)
        assert track.peak >= out.untyped_storage().nbytes()
        del out
    assert resident_bytes(portrait) == before
    # the batch scales the activations; the source's volume and the weights' copies do not
    assert 2.5 * peaks[0] < peaks[1] < 4 * peaks[0]


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0])
def test_speak_returns_the_seconds_of_24khz_audio(kokoro, seconds):
    audio = kk.speak(kokoro, seconds=seconds)
    assert audio.is_meta and audio.dtype == torch.float32 and audio.dim() == 1
    assert abs(audio.shape[0] - seconds * kk.SAMPLE_RATE) <= kk.SAMPLES_PER_FRAME


def test_one_frame_is_600_samples():
    # 2 (F0/N and the decoder's last block) x 10 x 6 (the generator) x 5 (the iSTFT hop)
    assert kk.SAMPLES_PER_FRAME == 600
    assert kk.FRAMES_PER_SECOND == 40
    tokens, durations = kk.plan(5.0)
    assert tokens == 65 + 2 and int(durations.sum()) == 200 and int(durations.min()) >= 1


def test_speak_runs_kmodels_forward_with_only_the_documented_lines_changed():
    from kokoro.model import KModel

    def lines(fn) -> set[str]:
        return {line.strip().split("  #")[0] for line in inspect.getsource(fn).splitlines()}

    body = inspect.getsource(KModel.forward_with_tokens).split("]:\n", 1)[1]
    upstream = [line.strip() for line in body.splitlines() if line.strip()]
    changed = [line for line in upstream if line not in lines(kk._forward_with_tokens)]
    # the module docstring's 1 (input_lengths), 2 (bert's mask) and 3 (pred_dur, indices)
    assert changed == [
        "input_lengths = torch.full(",
        "(input_ids.shape[0],),",
        "input_ids.shape[-1],",
        "device=input_ids.device,",
        "dtype=torch.long",
        ")",
        "bert_dur = self.bert(input_ids, attention_mask=(~text_mask).int())",
        "pred_dur = torch.round(duration).clamp(min=1).long().squeeze()",
        "indices = torch.repeat_interleave(torch.arange(input_ids.shape[1], "
        "device=self.device), pred_dur)",
    ]


# ---- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [0, -1, 1.5, True, "4"])
def test_animate_rejects_bad_frames(portrait, frames):
    with pytest.raises(ValueError, match="frames"):
        lp.animate(portrait, frames=frames)


@pytest.mark.parametrize("size", [128, 512, 255])
def test_animate_rejects_sizes_the_networks_are_not_built_for(portrait, size):
    with pytest.raises(ValueError, match="256"):
        lp.animate(portrait, size=size)


@pytest.mark.parametrize(
    "seconds", [0, -1.0, math.nan, math.inf, kk.MAX_SECONDS + 0.1, 0.05, True, "5"]
)
def test_speak_rejects_bad_seconds(kokoro, seconds):
    with pytest.raises(ValueError, match=r"seconds|too short"):
        kk.speak(kokoro, seconds=seconds)


def test_speak_takes_one_full_context():
    tokens, durations = kk.plan(kk.MAX_SECONDS)
    assert tokens == kk.CONTEXT_LENGTH
    assert int(durations.sum()) == round(kk.MAX_SECONDS * kk.FRAMES_PER_SECOND)
