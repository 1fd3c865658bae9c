"""The allocator settings: parsed as torch 2.13 parses them, and applied by the simulated card."""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import SimulatedBackend
from app.backends import torch_config
from app.backends.alloc_conf import (
    DEFAULT_SETTINGS,
    ENV_NAMES,
    LARGE_BUFFER,
    SIZE_MAX,
    parse_alloc_conf,
    settings_from_environment,
)
from tests.unit.test_pytorch_ports import check_memory_stat_consistency

GB = 1_000_000_000
MiB = 1 << 20
kMB = MiB


def test_allocator_config_test_cases():
    """c10/test/core/AllocatorConfig_test.cpp ``AllocatorConfigTest.allocator_config_test``."""
    env = ("max_split_size_mb:40,max_non_split_rounding_mb:30,garbage_collection_threshold:0.5,"
           "roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1],"
           "expandable_segments:True,pinned_use_background_threads:True")
    c = parse_alloc_conf(env)
    assert c.text == env
    assert c.max_split_size_bytes == 40 * kMB
    assert c.max_non_split_rounding_bytes == 30 * kMB
    assert c.garbage_collection_threshold == 0.5
    for mb, div in ((32, 8), (64, 8), (128, 2), (256, 4), (512, 2), (1024, 4), (2048, 1),
                    (4096, 1), (8192, 1)):
        assert c.divisions(mb * kMB) == div, mb
    assert c.expandable_segments is True
    assert c.passive["pinned_use_background_threads"] is True

    c = parse_alloc_conf("max_split_size_mb:20,max_non_split_rounding_mb:40,"
                         "garbage_collection_threshold:0.8")
    assert (c.max_split_size_bytes, c.max_non_split_rounding_bytes) == (20 * kMB, 40 * kMB)
    assert c.garbage_collection_threshold == 0.8

    c = parse_alloc_conf("roundup_power2_divisions:[128:8,256:16,512:1,2048:8,>:2]")
    for mb, div in ((64, 8), (128, 8), (256, 16), (512, 1), (1024, 0), (2048, 8), (4096, 2)):
        assert c.divisions(mb * kMB) == div, mb

    c = parse_alloc_conf("roundup_power2_divisions:4")
    assert [c.divisions(mb * kMB) for mb in (64, 256, 2048)] == [4, 4, 4]
    assert parse_alloc_conf("expandable_segments:False,").expandable_segments is False
    assert parse_alloc_conf("pinned_use_background_threads:False").passive[
        "pinned_use_background_threads"] is False
    with pytest.raises(ValueError, match="'foo'"):
        parse_alloc_conf("foo:123,bar:456")


@pytest.mark.parametrize("bad", ["max_split_size_mb", "max_split_size_mb:",
                                 "roundup_power2_divisions:[64:8", "garbage_collection_threshold:"])
def test_malformed_config_raises_value_error(bad):
    """AllocatorConfig_test.cpp ``malformed_config_raises_value_error``: the message names the
    text it could not read."""
    with pytest.raises(ValueError, match="allocator settings"):
        parse_alloc_conf(bad)


# Accepted and refused by torch's own parser (c10's, which the CPU build carries) alike.
SAME_AS_TORCH = [
    "", "expandable_segments:True", "max_split_size_mb:40", "max_split_size_mb:20",
    "roundup_power2_divisions:[64:8,256:4,>:1]", "roundup_power2_divisions:4",
    "garbage_collection_threshold:0.5", "max_non_split_rounding_mb:64",
    "max_split_size_mb:2", "garbage_collection_threshold:1.2", "garbage_collection_threshold:0",
    "expandable_segments:yes", "roundup_power2_divisions:3", "max_split_size_mb:40 , "
    "expandable_segments:True",
    # what std::stoull / std::stod and the unchecked separators let through, or not
    "max_split_size_mb,30", "max_split_size_mb:30:expandable_segments:True",
    "max_split_size_mb:+30", "max_split_size_mb:-30", "max_split_size_mb:30abc",
    "max_split_size_mb:0x20",
    "max_split_size_mb:99999999999999999999", "garbage_collection_threshold:0x0.8p0",
    "garbage_collection_threshold:nan", "garbage_collection_threshold:1e-320",
    "large_segment_size_mb:64,max_split_size_mb:40", "large_segment_size_mb:10",
    "large_segment_size_mb:11", "max_split_size_mb:40,large_segment_size_mb:64",
    "roundup_power2_divisions:[>:2,64:8]", "roundup_power2_divisions:[64:8",
    "roundup_power2_divisions:[]", "pinned_max_cached_size_mb:-1",
    "pinned_max_round_threshold_mb:x",
    "expandable_segments:True,", "expandable_segments:True,,", "expandable_segments\t:True",
]


def _torch_accepts(text: str) -> bool:
    """Whether the CPU build's parser takes ``text``; afterwards its state is put back to a
    fresh process's (large_segment_size_mb persists across texts, so it is reset first)."""
    setter = torch._C._accelerator_setAllocatorSettings
    try:
        setter(text)
        return True
    except (ValueError, RuntimeError, IndexError):
        return False
    finally:
        setter("large_segment_size_mb:20")
        setter("")


@pytest.mark.parametrize("text", SAME_AS_TORCH)
def test_the_parser_agrees_with_torchs(text):
    """The CPU build has no CUDA hook: it skips unknown keys, as ``cuda=False`` does."""
    _, error = torch_config.parse(text, cuda=False)
    assert (error is None) == _torch_accepts(text), error


_KEY_TOKENS = [*sorted(torch_config.KEYS), "foo", "max_split_size", "expandable"]
_VALUE_TOKENS = ["True", "False", "true", "1", "0", "-1", "+30", "20", "21", "64", "10", "11",
                 "0x20", "30abc", "1e3", "0.5", "0.5x", "nan", "inf", "1e-320", "1e999",
                 "99999999999999999999", "18446744073709551615", "[64:8,>:2]", "[64:8",
                 "[>:2,64:8]", "[]", "[3:2]", "[1:3]", "4", "3", "native", "cudaMallocAsync",
                 "foo", ""]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KEY_TOKENS), st.sampled_from([":", ",", ""]),
                          st.sampled_from(_VALUE_TOKENS)), max_size=4),
       st.sampled_from([",", ", ", ":"]), st.sampled_from(["", ",", ":", "[", "]", " "]))
def test_random_texts_are_taken_or_refused_as_torch_does(pairs, joint, tail):
    """Whatever an operator writes: accepted or refused by torch's CPU build and the port
    alike, and where both accept, the same large_segment_size (torch tells it in the floor it
    puts under max_split_size_mb)."""
    text = joint.join(k + sep + v for k, sep, v in pairs) + tail
    state, error = torch_config.parse(text, cuda=False)
    setter = torch._C._accelerator_setAllocatorSettings
    assert (error is None) == _torch_accepts(text), (text, error)
    if error is None:
        try:
            setter(text)
            with pytest.raises(ValueError, match=r"must be >= (\d+)") as exc:
                setter("max_split_size_mb:0")
        finally:
            setter("large_segment_size_mb:20")
            setter("")
        floor = int(re.search(r"must be >= (\d+)", str(exc.value)).group(1))
        assert floor == state.large_segment_size // MiB


def test_every_key_torch_knows_is_accepted_and_no_other():
    """The keys: CUDA's from the installed header (CUDAAllocatorConfig::getKeys), the
    device-generic ones found by asking the installed c10 which of its strings it reads
    a value for (a key it knows refuses the value "@"; one it does not know is skipped)."""
    include = Path(torch.__file__).parent / "include" / "c10"
    header = (include / "cuda" / "CUDAAllocatorConfig.h").read_text()
    body = header[header.index("getKeys()"):]
    body = body[body.index("{"):body.index("};")]
    body = re.sub(r"//[^\n]*", "", body)
    literals = re.findall(r'"([^"]*)"\s*(?=("?))', body)
    # adjacent literals concatenate ("release_lock_on_cud" "amalloc")
    joined = re.sub(r'"\s*"', "", body)
    cuda_keys = set(re.findall(r'"([a-z0-9_]+)"', joined))
    assert literals and cuda_keys == torch_config.CUDA_KEYS
    lib = next((Path(torch.__file__).parent / "lib").glob("libc10.*"))
    candidates = {w.decode() for w in re.findall(rb"(?<=\x00)([a-z][a-z0-9_]{4,60})(?=\x00)",
                                                 lib.read_bytes())}
    known = {k for k in candidates | torch_config.KEYS if not _torch_accepts(f"{k}:@")}
    assert known == torch_config.CORE_KEYS
    for key in torch_config.KEYS:  # CUDA's build takes every one with a good value
        good = {"backend": "native", "per_process_memory_fraction": "0.5",
                "roundup_power2_divisions": "4", "large_segment_size_mb": "20",
                "max_split_size_mb": "40", "max_non_split_rounding_mb": "40",
                "pinned_num_register_threads": "8", "pinned_reserve_segment_size_mb": "8",
                "pinned_max_round_threshold_mb": "8", "pinned_max_cached_size_mb": "8",
                "garbage_collection_threshold": "0.5"}.get(key, "True")
        parse_alloc_conf(f"{key}:{good}")
    with pytest.raises(ValueError, match="unrecognized key 'expandable'"):
        parse_alloc_conf("expandable:True")  # CUDA's build refuses what the CPU's skips
    assert torch_config.parse("expandable:True", cuda=False)[1] is None


@pytest.mark.parametrize("text", ["large_segment_size_mb:32", "throw_on_cudamalloc_oom:True",
                                  "pinned_free_catch_all:True"])
def test_the_keys_torch_213_added_start_a_card(text):
    """SimulatedBackend() refused these, and CudaBackend fell back to the defaults."""
    card = SimulatedBackend(GB, alloc_conf=text)
    assert card.allocator_settings.text == text


def _run_torch_reading(env: dict[str, str]) -> str:
    code = "import torch; print(torch._C._accelerator_getAllocatorSettings())"
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")} | env
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_environment_is_read_in_torchs_order(monkeypatch):
    """c10's AcceleratorAllocatorConfig::instance reads PYTORCH_CUDA_ALLOC_CONF first, then
    PYTORCH_HIP_ALLOC_CONF, then PYTORCH_ALLOC_CONF: the first one set wins."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    assert settings_from_environment() == DEFAULT_SETTINGS
    both = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64",
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert _run_torch_reading(both) == "expandable_segments:True"  # torch itself
    for name, value in both.items():
        monkeypatch.setenv(name, value)
    card = SimulatedBackend(GB)
    assert card.allocator_settings.expandable_segments
    assert card.allocator_settings.max_split_size_bytes == SIZE_MAX
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert SimulatedBackend(GB).allocator_settings.max_split_size_bytes == 64 * MiB
    assert not SimulatedBackend(GB, alloc_conf="").allocator_settings.expandable_segments
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:1")
    with pytest.raises(ValueError, match=r"PYTORCH_ALLOC_CONF.*max_split_size_mb"):
        SimulatedBackend(GB)


def test_large_segment_size_sizes_the_mid_segments_and_new_expandable_pages():
    card = SimulatedBackend(12 * GB, alloc_conf="large_segment_size_mb:64")
    card.allocate(5 * MiB)  # a 1-10 MiB request: a segment of large_segment_size
    assert card.sample().reserved_bytes == 64 * MiB
    card.allocate(80 * MiB + 1)  # from 10 MiB: the request rounded to 2 MiB, as before
    assert card.sample().reserved_bytes == 64 * MiB + 82 * MiB
    card = SimulatedBackend(12 * GB, alloc_conf="expandable_segments:True,large_segment_size_mb:32")
    card.allocate(40 * MiB)  # two 32 MiB pages
    assert card.sample().reserved_bytes == 64 * MiB
    card.set_allocator_settings("large_segment_size_mb:64")  # expandable stays on
    assert card.allocator_settings.expandable_segments
    card.allocate(30 * MiB)  # the segment keeps its 32 MiB pages: grows by one
    assert card.sample().reserved_bytes == 96 * MiB
    check_memory_stat_consistency(card)


def test_a_text_torch_refuses_leaves_what_it_parsed_before_the_error():
    """torch applies a text key by key: what came before the bad key stays in force, the
    size rules are reset, and large_segment_size_mb (read first) and expandable_segments
    keep their values across texts."""
    card = SimulatedBackend(GB, alloc_conf="max_split_size_mb:100")
    with pytest.raises(ValueError, match="max_non_split_rounding_mb"):
        card.set_allocator_settings("expandable_segments:True,large_segment_size_mb:32,"
                                    "max_non_split_rounding_mb:20")
    st_ = card.allocator_settings
    assert st_.expandable_segments and st_.large_segment_bytes == 32 * MiB
    assert st_.max_split_size_bytes == SIZE_MAX  # reset before parsing, as torch does
    card.set_allocator_settings("max_split_size_mb:40")  # 40 < 32? no: 40 >= 32, fine
    assert card.allocator_settings.large_segment_bytes == 32 * MiB  # kept
    assert card.allocator_settings.max_non_split_rounding_bytes == 32 * MiB  # reset to it
    with pytest.raises(ValueError, match="must be >= 32"):
        parse_alloc_conf("max_split_size_mb:20", previous=card.allocator_settings)


def test_a_memory_fraction_of_one_lifts_the_cap():
    """setMemoryFraction keeps no cap at 1.0: the garbage collection that needs one stops."""
    card = SimulatedBackend(4 * GB, alloc_conf="garbage_collection_threshold:0.5")
    card.set_per_process_memory_fraction(0.5)
    assert card.reservable_bytes() == 2 * GB
    card.set_per_process_memory_fraction(1.0)
    assert card.reservable_bytes() == 4 * GB and card.memory_fraction() == 1.0
    capped = SimulatedBackend(4 * GB, alloc_conf="per_process_memory_fraction:0.25")
    assert capped.reservable_bytes() == GB  # applied when the allocator is made


def test_max_split_size_oversize_blocks_are_never_split_and_serve_near_sizes_only():
    card = SimulatedBackend(12 * GB, alloc_conf="max_split_size_mb:100")
    card.free(card.allocate(400 * MiB))  # an oversize cached block
    reserved = card.sample().reserved_bytes
    small = card.allocate(50 * MiB)  # below max_split: never served by an oversize block
    assert card.sample().reserved_bytes == reserved + 50 * MiB
    card.free(small)
    near = card.allocate(400 * MiB - 4 * MiB)  # within max_non_split_rounding (20 MiB): reused
    assert card.sample().reserved_bytes == reserved + 50 * MiB
    stats = card.memory_stats()
    assert stats["oversize_allocations.current"] == 1 and stats["oversize_segments.current"] == 1
    assert stats["inactive_split_bytes.all.current"] == 0  # not split, although 4 MiB is spare
    card.free(near)
    far = card.allocate(300 * MiB)  # 100 MiB off: not reused, a segment of its own
    assert card.sample().reserved_bytes == reserved + 50 * MiB + 300 * MiB
    card.free(far)


def test_max_split_size_frees_oversize_blocks_before_everything_else():
    """release_available_cached_blocks: with max_split_size set, a new segment that does not
    fit first frees an oversize cached block that covers it, and keeps the rest of the cache."""
    card = SimulatedBackend(2 * GB, alloc_conf="max_split_size_mb:100")
    card.free(card.allocate(1 * GB))  # oversize, cached; too far from 0.95 GB to be reused
    card.free(card.allocate(50 * MiB))  # below max_split, cached
    card.allocate(int(0.95 * GB))  # needs the room the oversize block holds
    s = card.sample()
    assert s.num_alloc_retries == 0  # no full release was needed
    assert s.reserved_bytes == 950 * 10**6 // (2 * MiB) * (2 * MiB) + 2 * MiB + 50 * MiB


def test_garbage_collection_threshold_frees_old_blocks_under_a_cap():
    card = SimulatedBackend(10 * GB, alloc_conf="garbage_collection_threshold:0.5")
    card.set_per_process_memory_fraction(0.5)  # a 5 GB cap; collection past 2.5 GB
    old = [card.allocate(600 * MiB) for _ in range(4)]
    for h in old:
        card.free(h)
    for _ in range(50):  # small requests age the cached blocks
        card.free(card.allocate(1000))
    card.allocate(1 * GB)  # no cached fit: the collection frees aged blocks first
    s = card.sample()
    assert s.num_alloc_retries == 0  # collected, not retried
    assert s.reserved_bytes < 4 * 600 * MiB + GB


def test_garbage_collection_needs_a_memory_fraction():
    card = SimulatedBackend(4 * GB, alloc_conf="garbage_collection_threshold:0.5")
    for h in [card.allocate(600 * MiB) for _ in range(4)]:
        card.free(h)
    card.allocate(1 * GB)  # fits beside the cache: no collection without a cap
    assert card.sample().reserved_bytes == 4 * (600 * MiB) + 1_000_341_504  # 1 GB, rounded


def test_expandable_segments_map_pages_and_unmap_them_on_empty_cache():
    card = SimulatedBackend(12 * GB, alloc_conf="expandable_segments:True")
    a = card.allocate(30 * MiB)
    assert card.sample().reserved_bytes == 2 * LARGE_BUFFER  # two 20 MiB pages
    b = card.allocate(5 * MiB)  # the rest of the second page
    assert card.sample().reserved_bytes == 2 * LARGE_BUFFER
    card.free(a)
    s = card.sample()
    assert s.inactive_split_bytes == 0  # PyTorch counts none for expandable segments
    assert card.cache_state(0).releasable_bytes == LARGE_BUFFER  # only the whole first page
    card.empty_cache()
    assert card.sample().reserved_bytes == LARGE_BUFFER
    big = card.allocate(1 * GB)  # grows the segment: maps pages at its end
    assert card.sample().reserved_bytes == LARGE_BUFFER + -(-GB // LARGE_BUFFER) * LARGE_BUFFER
    for h in (b, big):
        card.free(h)
    card.empty_cache()
    assert card.sample().reserved_bytes == 0
    check_memory_stat_consistency(card)


@pytest.mark.parametrize("conf", ["", "expandable_segments:True", "max_split_size_mb:64",
                                  "roundup_power2_divisions:[64:8,256:4,>:1]",
                                  "garbage_collection_threshold:0.6"])
def test_random_churn_keeps_every_figure_consistent(conf):
    """The stats against the snapshot, and the cache's answers against a brute-force reading,
    after random allocations, frees and cleanups under each setting."""
    card = SimulatedBackend(4 * GB, alloc_conf=conf)
    if "garbage" in conf:
        card.set_per_process_memory_fraction(0.8)
    rng = random.Random(conf)
    live = []
    for step in range(1500):
        r = rng.random()
        if live and r < 0.45:
            card.free(live.pop(rng.randrange(len(live))))
        elif r < 0.46:
            card.empty_cache()
        else:
            size = rng.choice([0, 512, 4000, 300_000, 3 * MiB, 9 * MiB, 25 * MiB, 120 * MiB])
            with contextlib.suppress(torch.OutOfMemoryError):
                live.append(card.allocate(size + rng.randrange(512)))
        if step % 100 == 0:
            check_memory_stat_consistency(card)
            assert card.cache_state(0).releasable_bytes == releasable_by_hand(card)
    for h in live:
        card.free(h)
    card.empty_cache()
    assert card.sample().reserved_bytes == 0


def releasable_by_hand(card: SimulatedBackend) -> int:
    """What empty_cache would return, read from the snapshot: whole free native segments and
    the whole free pages of expandable ones."""
    total = 0
    page_large, page_small = LARGE_BUFFER, 2 * MiB
    snap = card.memory_snapshot()["segments"]
    for seg in snap:
        page = page_small if seg["segment_type"] == "small" else page_large
        for b in seg["blocks"]:
            if b["state"] != "inactive":
                continue
            if seg["is_expandable"]:
                base = seg["address"]  # a mapped range starts on a page of its segment
                start, end = b["address"] - base, b["address"] - base + b["size"]
                total += max(0, end // page * page - -(-start // page) * page)
            elif len(seg["blocks"]) == 1:
                total += b["size"]
    return total
