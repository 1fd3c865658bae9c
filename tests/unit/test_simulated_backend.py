"""The simulated card must behave like the caching allocator where the monitor can tell."""

from __future__ import annotations

import random
import threading
import uuid

import pytest
import torch

from app import SimulatedBackend
from app.backends import MemoryBackend
from app.backends.alloc_conf import DEFAULT_SETTINGS
from tests.conftest import GB, MB

MiB = 1 << 20


def test_is_a_memory_backend(card):
    assert isinstance(card, MemoryBackend)
    assert card.device == "sim:0"
    assert card.name == "Simulated GPU (12 GB)"


def test_uuid_is_stable_and_never_a_real_gpu_one():
    a = SimulatedBackend(12 * GB)
    assert a.uuid == SimulatedBackend(12 * GB).uuid  # the same card in every run
    assert a.uuid.startswith("SIM-") and uuid.UUID(a.uuid.removeprefix("SIM-"))
    other = SimulatedBackend(12 * GB, device="sim:1", name="Simulated RTX 3060")
    assert other.name == "Simulated RTX 3060"
    assert other.uuid != a.uuid


def test_device_memory_takes_reserved_from_the_sample_given(card):
    card.allocate(100 * MiB)
    s = card.sample()
    card.allocate(100 * MiB)  # reserved moves on after the sample
    dm = card.device_memory(s)
    assert dm.free_bytes + s.reserved_bytes + dm.non_torch_bytes == dm.total_bytes
    assert card.device_memory().free_bytes == 12 * GB - 200 * MiB


def test_rounding_like_the_caching_allocator():
    assert DEFAULT_SETTINGS.round_size(1) == 512
    assert DEFAULT_SETTINGS.round_size(513) == 1024
    assert DEFAULT_SETTINGS.allocation_size(512) == 2 * MiB  # small pool
    assert DEFAULT_SETTINGS.allocation_size(5 * MiB) == 20 * MiB
    assert DEFAULT_SETTINGS.allocation_size(11 * MiB + 1) == 12 * MiB  # large: rounded to 2 MiB


def test_freed_memory_stays_reserved_until_empty_cache(card):
    h = card.allocate(100 * MiB)
    s = card.sample()
    assert (s.allocated_bytes, s.reserved_bytes) == (100 * MiB, 100 * MiB)
    card.free(h)
    s = card.sample()
    assert (s.allocated_bytes, s.reserved_bytes) == (0, 100 * MiB)
    assert card.device_memory().free_bytes == 12 * GB - 100 * MiB
    card.empty_cache()
    assert card.sample().reserved_bytes == 0


def test_cached_block_is_reused_and_split(card):
    card.free(card.allocate(100 * MiB))
    h = card.allocate(40 * MiB)  # best fit from the cache, no new segment
    s = card.sample()
    assert s.reserved_bytes == 100 * MiB
    assert s.allocated_bytes == 40 * MiB
    # The 60 MiB rest is free inside a segment in use: empty_cache cannot return it.
    assert s.inactive_split_bytes == 60 * MiB
    card.empty_cache()
    assert card.sample().reserved_bytes == 100 * MiB
    card.free(h)  # the halves merge back; now the whole segment can go
    assert card.sample().inactive_split_bytes == 0
    card.empty_cache()
    assert card.sample().reserved_bytes == 0


def test_peak_and_reset(card):
    h = card.allocate(300 * MiB)
    card.free(h)
    assert card.sample().peak_allocated_bytes == 300 * MiB
    card.reset_peak()
    assert card.sample().peak_allocated_bytes == 0


def test_oom_raises_torch_error_after_releasing_cache(card):
    card.free(card.allocate(4 * GB))  # cached, not allocated
    big = card.allocate(8 * GB)  # fits only once the cache is released: a retry
    before = card.sample()
    assert before.num_alloc_retries == 1 and before.num_ooms == 0
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        card.allocate(5 * GB)
    s = card.sample()
    assert s.num_ooms == 1 and s.num_alloc_retries == 2
    assert s.allocated_bytes == before.allocated_bytes  # a refused allocation changes nothing
    card.free(big)


def test_context_memory_is_not_torch_memory():
    card = SimulatedBackend(12 * GB, context_bytes=500 * MB)
    card.allocate(1 * GB)
    dm = card.device_memory()
    assert dm.total_bytes == 12 * GB
    assert dm.non_torch_bytes == 500 * MB
    assert dm.total_bytes - dm.free_bytes - card.sample().reserved_bytes == 500 * MB
    with pytest.raises(torch.OutOfMemoryError):
        card.allocate(int(10.6 * GB))


@pytest.mark.parametrize("bad", [dict(total_bytes=0), dict(total_bytes=GB, context_bytes=GB)])
def test_bad_construction(bad):
    with pytest.raises(ValueError):
        SimulatedBackend(**bad)


def test_double_free_is_an_error(card):
    h = card.allocate(MB)
    card.free(h)
    with pytest.raises(ValueError, match="already freed"):
        card.free(h)


def test_thread_safe_under_concurrent_churn(card):
    start = threading.Barrier(4)
    errors = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        live = []
        start.wait()
        try:
            for _ in range(2000):
                if live and rng.random() < 0.5:
                    card.free(live.pop(rng.randrange(len(live))))
                else:
                    live.append(card.allocate(rng.choice([512, 300_000, 3 * MiB, 25 * MiB])))
                if rng.random() < 0.01:
                    card.empty_cache()
            for h in live:
                card.free(h)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = card.sample()
    assert s.allocated_bytes == 0 and s.inactive_split_bytes == 0
    card.empty_cache()
    assert card.sample().reserved_bytes == 0
