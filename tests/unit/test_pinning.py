"""What ``vortex-vram frag`` finds pinned, on snapshots of a real simulated card."""

from __future__ import annotations

import orjson
import pytest

from app import SimulatedBackend
from app.cli.pinning import innermost_frame, pinned_segments, report

MiB = 1 << 20
SEGMENT = 20 * MiB  # the large pool's segment for 1-10 MiB requests (kLargeBuffer)


def _pin(card: SimulatedBackend, each: int, n: int, groups: int = 1) -> list[int]:
    """Allocate ``groups`` runs of ``n`` blocks of ``each`` bytes, then free all but the first
    of each run (all allocated first: a freed block would serve the next run)."""
    runs = [[card.allocate(each) for _ in range(n)] for _ in range(groups)]
    for run in runs:
        for h in run[1:]:
            card.free(h)
    return [run[0] for run in runs]


def test_a_segment_held_by_one_small_block_is_pinned_with_who_allocated_it() -> None:
    card = SimulatedBackend(12 * 10**9)
    card.record_memory_history(True)
    a = []
    for _ in range(4):  # a loop, not a comprehension: the frame is then this function's
        a.append(card.allocate(5 * MiB))  # one 20 MiB segment
    card.allocate(100 * MiB)  # its own segment, all live: not pinned
    c = card.allocate(300 * MiB)
    busy = [card.allocate(3 * MiB // 2) for _ in range(6)]  # 9 of 20 MiB
    for h in (*a[1:], c, busy[5]):
        card.free(h)  # a quarter of a's segment stays live; c's is all free (returnable);
        # busy's is 62.5 % free, but held by 5 live blocks
    found = pinned_segments(card.memory_snapshot())
    assert found.segments == 4
    (seg,) = found.pinned
    assert (seg.size_bytes, seg.free_bytes, seg.pool, seg.page) == (
        SEGMENT, 15 * MiB, "large", False)
    (block,) = seg.live
    assert block.size_bytes == block.requested_bytes == 5 * MiB
    assert block.address == seg.address
    # The card's own frame (app/backends) is skipped: the frame is this test's.
    assert block.frame is not None and block.frame.startswith("unit/test_pinning.py:")
    assert block.frame.endswith(
        " in test_a_segment_held_by_one_small_block_is_pinned_with_who_allocated_it")
    assert found.stranded_bytes == 15 * MiB


def test_more_live_blocks_or_less_free_is_not_pinned_and_the_limits_move() -> None:
    card = SimulatedBackend(12 * 10**9)
    busy = [card.allocate(3 * MiB) for _ in range(6)]  # 18 of 20 MiB live
    for h in busy[1:]:
        card.free(h)  # 17 of 20 MiB free, one live
    snap = card.memory_snapshot()
    assert len(pinned_segments(snap).pinned) == 1
    assert pinned_segments(snap, min_free_share=0.9).pinned == ()  # 85 % free
    card2 = SimulatedBackend(12 * 10**9)
    busy = [card2.allocate(2 * MiB) for _ in range(9)]
    for h in busy[5:]:
        card2.free(h)  # 5 live blocks, 10 of 20 MiB free
    snap2 = card2.memory_snapshot()
    assert pinned_segments(snap2).pinned == ()
    assert len(pinned_segments(snap2, max_live=5).pinned) == 1
    assert card.sample().allocated_bytes == 3 * MiB  # frees were real


def test_free_in_pinned_segments_is_the_cards_inactive_split() -> None:
    # With no limit on share or count, every segment in use with free blocks is "pinned":
    # its free bytes are exactly what the allocator counts as inactive split.
    card = SimulatedBackend(12 * 10**9)
    for each, n in ((5 * MiB, 4), (3 * MiB, 6), (256 << 10, 7), (40 * MiB, 3)):
        _pin(card, each, n)
    found = pinned_segments(card.memory_snapshot(), min_free_share=0.0, max_live=10**6)
    assert found.stranded_bytes == card.sample().inactive_split_bytes > 0
    assert {s.pool for s in found.pinned} == {"small", "large"}


def test_under_expandable_segments_the_pages_are_what_is_pinned() -> None:
    # PyTorch counts no inactive split here; the free rest of each page a live block
    # touches is stranded all the same (empty_cache unmaps whole free pages only).
    card = SimulatedBackend(2 * 10**9, alloc_conf="expandable_segments:True")
    handles = [card.allocate(5 * MiB) for _ in range(40)]  # 10 pages of 20 MiB, 4 a page
    for i, h in enumerate(handles):
        if i % 4:
            card.free(h)
    assert card.sample().inactive_split_bytes == 0
    snap = card.memory_snapshot()
    found = pinned_segments(snap)
    assert found.segments == 1  # one mapped range
    assert len(found.pinned) == 10
    assert all(p.page and p.size_bytes == SEGMENT and p.free_bytes == 15 * MiB
               and len(p.live) == 1 for p in found.pinned)
    assert found.stranded_bytes == 150 * MiB
    lines = report(found, top=3)
    assert lines[0].startswith(f"page {found.pinned[0].address:#x}  large expandable  size "
                               "20.972 MB  free 15.729 MB (75.0 %)  held by 1 live block:")
    assert lines[1].split() == ["5.243", "MB", "at", f"{found.pinned[0].live[0].address:#x}"]
    assert lines[-2] == "... and 7 more"
    assert lines[-1] == ("pinned 10 pages in 1 segment (at least 50 % free, at most 4 live "
                         "blocks), stranding 0.157 GB")


def test_the_json_of_the_snapshot_reads_the_same() -> None:
    card = SimulatedBackend(12 * 10**9)
    card.record_memory_history(True)
    _pin(card, 4 * MiB, 5, groups=3)
    snap = card.memory_snapshot()
    as_json = orjson.loads(orjson.dumps(snap))  # what ?format=json sends
    assert pinned_segments(as_json) == pinned_segments(snap)
    assert len(pinned_segments(snap).pinned) == 3


def test_odd_snapshots_are_read_as_far_as_they_go() -> None:
    for bad in ({}, [], None, {"segments": "x"}, {"segments": None}):
        with pytest.raises(ValueError, match="no list of segments"):
            pinned_segments(bad)
    odd = {"segments": [
        None, 3, "s", {}, {"blocks": "x"}, {"total_size": "big", "blocks": [None, 1]},
        {"blocks": [{"size": "big"}, {"size": -5, "state": "inactive"}, {"size": True},
                    {"size": 512, "state": "weird"}, {"size": 512, "state": None}]},
        {"address": None, "segment_type": 7, "blocks": [
            {"size": 512, "state": "active_allocated", "frames": "not a list"},
            {"size": 4096, "state": "inactive", "frames": [None]}]},
        {"address": 1 << 40, "is_expandable": True, "segment_type": "large",
         "total_size": 10**15, "blocks": [{"size": 10**15, "state": "inactive"},
                                          {"size": 512, "state": "active_pending_free"}]},
    ]}
    found = pinned_segments(odd)
    assert found.segments == 9
    (seg,) = [p for p in found.pinned if not p.page]
    assert (seg.size_bytes, seg.free_bytes, seg.pool) == (4608, 4096, "?")
    assert report(found)[-1].startswith("pinned ")


def test_the_innermost_frame_outside_torch_and_this_package() -> None:
    frames = [None, {"filename": 3}, {"filename": "??", "line": 0, "name": "c10::alloc"},
              {"filename": "/usr/lib/python3/site-packages/torch/nn/modules/linear.py",
               "line": 125, "name": "forward"},
              {"filename": "/srv/vortex/app/backends/cuda.py", "line": 9, "name": "x"},
              {"filename": "C:\\director\\pipeline\\stages.py", "line": 42, "name": "upscale"},
              {"filename": "/srv/director/main.py", "line": 3, "name": "run"}]
    assert innermost_frame(frames) == "pipeline/stages.py:42 in upscale"
    assert innermost_frame(frames[:5]) is None
    assert innermost_frame([{"filename": "run.py"}]) == "run.py:? in ?"
    assert innermost_frame(None) is None and innermost_frame("x") is None
