"""The allocator settings: parsed as torch 2.13 parses them, and applied by the simulated card."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from app import SimulatedBackend
from app.backends.alloc_conf import (
    DEFAULT_SETTINGS,
    LARGE_BUFFER,
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
]


@pytest.mark.parametrize("text", SAME_AS_TORCH)
def test_the_parser_agrees_with_torchs(text):
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        pytest.skip("this torch has no _accelerator_setAllocatorSettings")
    try:
        setter(text)
        torch_ok = True
    except (ValueError, RuntimeError):
        torch_ok = False
    finally:
        setter("")
    try:
        parse_alloc_conf(text)
        ours = True
    except ValueError:
        ours = False
    assert ours == torch_ok


def test_the_environment_is_read_as_torch_reads_it(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert settings_from_environment() == DEFAULT_SETTINGS
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert SimulatedBackend(GB).allocator_settings.expandable_segments  # the older name
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")
    card = SimulatedBackend(GB)  # the newer name wins
    assert card.allocator_settings.max_split_size_bytes == 64 * MiB
    assert not card.allocator_settings.expandable_segments
    assert not SimulatedBackend(GB, alloc_conf="").allocator_settings.expandable_segments
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:1")
    with pytest.raises(ValueError, match=r"PYTORCH_ALLOC_CONF.*max_split_size_mb"):
        SimulatedBackend(GB)


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
                base = min(s["address"] for s in snap if s["is_expandable"]
                           and s["segment_type"] == seg["segment_type"])
                start, end = b["address"] - base, b["address"] - base + b["size"]
                total += max(0, end // page * page - -(-start // page) * page)
            elif len(seg["blocks"]) == 1:
                total += b["size"]
    return total
