"""PyTorch's own allocator tests, ported to the simulated card with their upstream numbers.

Each docstring names the upstream test (pytorch/pytorch, test/test_cuda.py or
test/test_cuda_multigpu.py). A ``Tensor`` here is a handle whose last reference frees its
block, as a CUDA tensor's storage does, so the upstream ``del`` statements keep their meaning.
"""

from __future__ import annotations

import collections
import gc
import json
import random

import pytest
import torch
from torch.cuda import _memory_viz

from app import SimulatedBackend

GB = 1_000_000_000
MiB = 1 << 20


class Tensor:
    """A float32 tensor of ``numel`` elements on ``card`` (or int8 with ``itemsize=1``)."""

    def __init__(self, card: SimulatedBackend, numel: int, itemsize: int = 4) -> None:
        self.card, self._numel, self.handle = card, numel, None
        self.handle = card.allocate(numel * itemsize)

    def numel(self) -> int:
        return self._numel

    def __del__(self) -> None:
        if self.handle is not None:  # None: the allocation raised
            self.card.free(self.handle)


@pytest.fixture
def card() -> SimulatedBackend:
    return SimulatedBackend(12 * GB, alloc_conf="")


def memory_allocated(card):
    return card.memory_stats()["allocated_bytes.all.current"]


def max_memory_allocated(card):
    return card.memory_stats()["allocated_bytes.all.peak"]


def memory_reserved(card):
    return card.memory_stats()["reserved_bytes.all.current"]


def max_memory_reserved(card):
    return card.memory_stats()["reserved_bytes.all.peak"]


def check_memory_stat_consistency(card):
    """test_cuda.py's ``_check_memory_stat_consistency``: every stat equals what the
    snapshot's segments and blocks add up to."""
    snapshot = card.memory_snapshot()["segments"]
    expected = collections.defaultdict(int)
    for segment in snapshot:
        expandable = segment["is_expandable"]
        pool_str = segment["segment_type"] + "_pool"
        if not expandable:
            expected["segment.all.current"] += 1
            expected["segment." + pool_str + ".current"] += 1
        for key, field in (("allocated_bytes", "allocated_size"), ("reserved_bytes", "total_size"),
                           ("active_bytes", "active_size"),
                           ("requested_bytes", "requested_size")):
            expected[f"{key}.all.current"] += segment[field]
            expected[f"{key}.{pool_str}.current"] += segment[field]
        sum_requested = 0
        is_split = len(segment["blocks"]) > 1
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                expected["allocation.all.current"] += 1
                expected["allocation." + pool_str + ".current"] += 1
            if block["state"].startswith("active_"):
                sum_requested += block["requested_size"]
                expected["active.all.current"] += 1
                expected["active." + pool_str + ".current"] += 1
            if block["state"] == "inactive" and is_split and not expandable:
                expected["inactive_split.all.current"] += 1
                expected["inactive_split." + pool_str + ".current"] += 1
                expected["inactive_split_bytes.all.current"] += block["size"]
                expected["inactive_split_bytes." + pool_str + ".current"] += block["size"]
        assert sum_requested == segment["requested_size"]
    stats = card.memory_stats()
    for k, v in expected.items():
        assert v == stats[k], k


def memory_stats_generator(card, N=35):
    """test_cuda_multigpu.py's ``_test_memory_stats_generator``, step for step."""
    m0 = memory_allocated(card)
    last_m_arr = [memory_allocated(card)]
    max_m_arr = [max_memory_allocated(card)]
    last_r_arr = [memory_reserved(card)]
    max_r_arr = [max_memory_reserved(card)]

    def alloc(*size):
        n = 1
        for d in size:
            n *= d
        return Tensor(card, n)

    def assert_change(comp=1, empty_cache=False, reset_peak=False):
        new_m = memory_allocated(card)
        new_max_m = max_memory_allocated(card)
        if comp > 0:
            assert new_m > last_m_arr[0]
        elif comp < 0:
            assert new_m < last_m_arr[0]
        else:
            assert new_m == last_m_arr[0]
        assert new_m <= new_max_m
        assert new_max_m >= max_m_arr[0]
        last_m_arr[0] = new_m
        max_m_arr[0] = new_max_m

        new_r = memory_reserved(card)
        new_max_r = max_memory_reserved(card)
        assert new_r <= new_max_r
        assert new_max_r >= max_r_arr[0]
        last_r_arr[0] = new_r
        max_r_arr[0] = new_max_r

        if empty_cache:
            stats = card.memory_stats()
            num_sync_1 = stats.get("num_sync_all_streams", -1)
            assert num_sync_1 >= 0
            num_alloc_1 = stats.get("num_device_alloc", -1)
            assert num_alloc_1 >= (0 if new_m == 0 else 1)
            num_free_1 = stats.get("num_device_free", -1)
            assert num_free_1 >= 0
            card.empty_cache()
            stats = card.memory_stats()
            assert stats["num_sync_all_streams"] == num_sync_1 + 1
            assert stats["num_device_alloc"] >= num_alloc_1
            assert stats["num_device_free"] >= num_free_1
            new_r = memory_reserved(card)
            new_max_r = max_memory_reserved(card)
            assert new_r <= last_r_arr[0]
            assert new_r <= new_max_r
            assert new_max_r == max_r_arr[0]
            last_r_arr[0] = new_r

        if reset_peak:
            card.reset_peak()
            assert memory_allocated(card) == last_m_arr[0]
            assert max_memory_allocated(card) == last_m_arr[0]
            max_m_arr[0] = last_m_arr[0]
            assert memory_reserved(card) == last_r_arr[0]
            assert max_memory_reserved(card) == last_r_arr[0]
            max_r_arr[0] = last_r_arr[0]

    assert_change(0)
    assert_change(0, reset_peak=True)
    assert_change(0, empty_cache=True)
    assert_change(0, reset_peak=True)
    assert_change(0)
    yield

    tensors1 = [alloc(1), alloc(10, 20), alloc(200, 300, 2000)]
    m1 = memory_allocated(card)
    assert_change(1)
    yield

    tensors2 = []
    for i in range(1, int(N / 2) + 1):  # small ones
        tensors2.append(alloc(i, i * 4))
        assert_change(1)
        yield

    for i in range(5, int(N / 2) + 5):  # large ones
        tensors2.append(alloc(i, i * 7, i * 9, i * 11))
        assert_change(1, reset_peak=(i % 2 == 0))
        yield

    tensors2.append(alloc(0, 0, 0))
    assert_change(0)
    yield

    permute = []
    for i in torch.randperm(len(tensors2)):
        permute.append(tensors2[i])
        assert_change(0)
        yield

    del tensors2
    assert_change(0)
    yield
    tensors2 = permute
    assert_change(0)
    yield
    del permute
    assert_change(0, reset_peak=True)
    yield

    for i in range(int(N / 2)):
        x = tensors2[i].numel()
        del tensors2[i]
        assert_change(-x)  # in case that tensors2[i] is empty
        yield

    for i in range(2, int(2 * N / 3) + 2):
        tensors2.append(alloc(i, i * 3, i * 8))
        assert_change(1)
        yield

    del tensors2
    assert_change(-1, reset_peak=True)
    assert_change(0)
    assert memory_allocated(card) == m1
    yield True

    del tensors1
    assert_change(-1, reset_peak=True)
    assert memory_allocated(card) == m0

    assert_change(0, empty_cache=True)
    assert_change(0, reset_peak=True)


@pytest.mark.parametrize("conf", ["", "expandable_segments:True", "max_split_size_mb:40",
                                  "roundup_power2_divisions:4"])
def test_memory_stats_generator_with_consistency_checks(conf):
    """test_cuda_multigpu.py ``test_memory_stats_multigpu``'s generator, each step followed by
    test_cuda.py's ``_check_memory_stat_consistency`` (as ``test_memory_stats`` does there),
    under the default settings and three others."""
    card = SimulatedBackend(12 * GB, alloc_conf=conf)
    torch.manual_seed(0)
    for _ in memory_stats_generator(card):
        check_memory_stat_consistency(card)


def test_memory_stats(card):
    """test_cuda.py ``test_memory_stats``: 1 kB active, then freed and counted as freed."""
    gc.collect()
    card.empty_cache()
    card.reset_peak()
    card.reset_accumulated()
    prev_allocated = memory_allocated(card)
    prev_reserved = memory_reserved(card)
    assert prev_allocated == max_memory_allocated(card)
    assert prev_reserved == max_memory_reserved(card)
    prev_active_current = card.memory_stats()["active_bytes.all.current"]
    tmp = Tensor(card, 256)
    assert card.memory_stats()["active_bytes.all.current"] == 1024 + prev_active_current
    assert card.memory_stats()["active_bytes.all.freed"] == 0
    del tmp
    gc.collect()
    card.empty_cache()
    assert card.memory_stats()["active_bytes.all.current"] == prev_active_current
    assert card.memory_stats()["active_bytes.all.freed"] == 1024
    card.reset_peak()
    assert max_memory_allocated(card) == prev_allocated
    assert max_memory_reserved(card) == prev_reserved


def test_set_per_process_memory_fraction(card):
    """test_cuda.py ``test_set_per_process_memory_fraction``: 0.499 of the card fits under a
    0.5 cap, 0.5 of it does not (its 2 MiB-rounded segment crosses the cap), and the OOM
    leaves the card usable."""
    card.reset_peak()
    with pytest.raises(TypeError, match="Invalid type"):
        card.set_per_process_memory_fraction(1)
    with pytest.raises(ValueError, match="Invalid fraction value"):
        card.set_per_process_memory_fraction(-0.1)
    with pytest.raises(ValueError, match="Invalid fraction value"):
        card.set_per_process_memory_fraction(2.0)

    tensor = Tensor(card, 1024)
    card.empty_cache()
    total_memory = 12 * GB
    card.set_per_process_memory_fraction(0.5)

    application = int(total_memory * 0.499) - max_memory_reserved(card)
    tmp_tensor = Tensor(card, application, itemsize=1)
    del tmp_tensor
    card.empty_cache()

    application = int(total_memory * 0.5)
    with pytest.raises(RuntimeError, match="out of memory"):
        Tensor(card, application, itemsize=1)
    tensor2 = Tensor(card, 1024)  # the OOM does not disturb what follows
    assert memory_allocated(card) == 2 * 4096
    del tensor, tensor2


def test_out_of_memory_retry(card):
    """test_cuda.py ``test_out_of_memory_retry``: half the card twice does not fit; once the
    first half is freed, its cached block serves the second."""
    card.empty_cache()
    size = int(12 * GB * 0.5)
    a = Tensor(card, size, itemsize=1)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        Tensor(card, size, itemsize=1)
    del a
    b = Tensor(card, size, itemsize=1)
    del b
    card.empty_cache()
    card.reset_peak()
    assert memory_reserved(card) == 0


def test_memory_snapshot(card):
    """test_cuda.py ``test_memory_snapshot``: with history on, the block of ``x`` carries the
    frames of the code that allocated it, its address is its pointer, and the last event
    after ``empty_cache`` frees a segment."""
    card.empty_cache()
    card.record_memory_history(True)
    try:
        Tensor(card, 2 * 311 * 411)  # make x the second block in a segment
        unused = Tensor(card, 310 * 410)
        x = Tensor(card, 311 * 411)
        tensors = [Tensor(card, 128) for _ in range(1000)]
        rng = random.Random(0)
        while tensors:
            del tensors[rng.randint(0, len(tensors) - 1)]
        Tensor(card, 128 * 5)

        ss = card.memory_snapshot()
        found_it = False
        for seg in ss["segments"]:
            assert "frames" in seg
            for b in seg["blocks"]:
                if b["requested_size"] == 311 * 411 * 4:
                    assert "test_pytorch_ports" in b["frames"][0]["filename"]
                    found_it = True
                    assert b["state"] == "active_allocated"
        assert found_it
        del unused, x
        card.empty_cache()
        ss = card.memory_snapshot()
        assert ss["device_traces"][0][-1]["action"] in ("segment_free", "segment_unmap")
        json.dumps(ss)  # as test_memory_plots: the snapshot serialises
    finally:
        card.record_memory_history(False)


def power2_div(size, div_factor):
    """test_cuda.py ``test_allocator_settings``'s reference rounding."""
    pow2 = 1
    while pow2 < size:
        pow2 = pow2 * 2
    if pow2 == size:
        return pow2
    step = pow2 / 2 / div_factor
    ret = pow2 / 2
    while ret < size:
        ret = ret + step
    return ret


def test_allocator_settings(card):
    """test_cuda.py ``test_allocator_settings``, with its numbers: 84 MiB rounds to 96 MiB
    with 4 divisions and to 88 MiB with 8; 400 MiB to 512 MiB with 2; a new settings text
    resets the rounding; bad texts are ValueErrors."""
    key_allocated = "active_bytes.all.allocated"
    key_requested = "requested_bytes.all.allocated"
    nelems = 21 * 1024 * 1024
    nbytes = 4 * nelems
    nelems_big = 100 * 1024 * 1024
    nbytes_big = 4 * nelems_big

    def stat(key):
        return card.memory_stats()[key]

    card.empty_cache()
    start_mem = stat(key_allocated)
    card.set_allocator_settings("")
    x = Tensor(card, nelems)
    reg_mem = stat(key_allocated)
    start_requested = stat(key_requested)
    card.set_allocator_settings("roundup_power2_divisions:4")
    y = Tensor(card, nelems)
    pow2_div4_mem = stat(key_allocated)
    current_requested = stat(key_requested)
    assert reg_mem - start_mem == nbytes == 88080384
    assert pow2_div4_mem - reg_mem == power2_div(nbytes, 4) == 100663296
    assert current_requested - start_requested == nbytes

    card.set_allocator_settings("garbage_collection_threshold:0.5")
    card.set_allocator_settings("garbage_collection_threshold:0.5,max_split_size_mb:40")
    card.empty_cache()
    start_mem = stat(key_allocated)
    z = Tensor(card, nelems)
    assert stat(key_allocated) - start_mem == nbytes  # the power2 divisions were reset

    card.empty_cache()
    card.set_allocator_settings("garbage_collection_threshold:0.5,"
                                "roundup_power2_divisions:[64:8,128:2,256:2,512:2,1024:1,>:1]")
    start_mem = stat(key_allocated)
    w = Tensor(card, nelems)
    assert stat(key_allocated) - start_mem == power2_div(nbytes, 8) == 92274688

    card.empty_cache()
    start_mem = stat(key_allocated)
    v = Tensor(card, nelems_big)
    assert stat(key_allocated) - start_mem == power2_div(nbytes_big, 2) == 536870912

    card.empty_cache()
    card.set_allocator_settings("release_lock_on_cudamalloc:True")
    start_mem = stat(key_allocated)
    w2 = Tensor(card, nelems)
    assert stat(key_allocated) - start_mem == nbytes

    for bad in ("foo:1,bar:2", "garbage_collection_threshold:1.2", "max_split_size_mb:2",
                "release_lock_on_cudamalloc:none", "pinned_use_cuda_host_register:none",
                "pinned_num_register_threads:none"):
        with pytest.raises(ValueError):
            card.set_allocator_settings(bad)
    del x, y, z, w, v, w2


def test_memory_viz_reads_the_simulated_card():
    """torch.cuda._memory_viz's own readers on the card's snapshot: ``segsum`` (which checks
    that every segment's blocks add up), ``segment_plot``, ``trace_plot`` and ``trace``."""
    for conf in ("", "expandable_segments:True"):
        card = SimulatedBackend(12 * GB, alloc_conf=conf)
        card.record_memory_history(True)
        live = [card.allocate(n) for n in (512, 300_000, 3 * MiB, 25 * MiB, 4 * MiB)]
        card.free(live[2])
        snap = card.memory_snapshot()
        summary = _memory_viz.segsum(snap)
        assert "segments: " in summary and "Segment size mismatch" not in summary
        assert "<script" in _memory_viz.segment_plot(snap)
        assert "<script" in _memory_viz.trace_plot(snap)
        text = _memory_viz.trace(snap)  # the events, one per line, blocks named a, b, ...
        assert " = " in text and "del " in text and "free completed" in text
