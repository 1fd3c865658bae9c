"""The allocator model: what a request, a slot or a cleanup would do, under the hard limit.

Every decision of the monitor that depends on how the caching allocator places memory is
made here, and only here: ``check_allocation``, ``fit_allocation``, ``admit``, the limit
guard's recoveries, the snapshot's ``fragmentation`` object and what the CLI shows of it. The
model answers three questions from one allocator sample and, when the counters cannot decide,
one read of the backend's cache (``CacheState``):

* what a request of N bytes would do: reuse a cached free block of its pool that fits, or
  reserve a new segment of the allocator's size (pages under expandable segments);
* how much a cleanup can return now: whole free segments only, or whole free pages under
  expandable segments (``releasable_bytes``); inactive split never;
* whether the request can be placed at all: a block fits, or the device (within the
  per-process cap) has room for the new segment once the releasable cache is returned, which
  the allocator does by itself before it raises an OOM.

The limit basis decides what the hard limit is compared with: allocated bytes (live tensors)
or reserved bytes (what the process holds, cache included). On the reserved basis a reused
block adds nothing, a new segment adds its size, and a cleanup lowers the figure by what it
returns: that is the one case where the *monitor* must release the cache before the request
(the allocator only does when the device is full), and the model says so (``cleanup``).

The common case costs two comparisons: when a new segment has room on the device and under
the limit, whatever the cache holds, nothing else needs to be known.
"""

from __future__ import annotations

from typing import NamedTuple

from app.backends import AllocatorSample, CacheState, MemoryBackend
from app.backends.alloc_conf import (
    MIN_BLOCK,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_BUFFER,
    SMALL_SIZE,
    AllocatorSettings,
)
from app.backends.rehearsal import LIMIT_BASES

GB = 1_000_000_000


class Verdict(NamedTuple):
    """What a request would do. ``ok``: it can be placed and stays under the hard limit
    (after the cleanup that ``cleanup`` asks for, when it does)."""

    ok: bool
    projected_bytes: int  # usage on the limit basis once it is allocated
    placeable: bool  # the allocator can place it (by itself releasing its cache if need be)
    cleanup: bool  # the monitor must release the cache first: reserved basis, only then under
    cache: CacheState | None  # None: decided from the counters alone


class SlotVerdict(NamedTuple):
    """What a slot of ``activation`` bytes above the current level would do."""

    peak_bytes: int  # usage on the limit basis at the slot's forecast peak
    scale: float  # the share of the activation that fits, in [0, 1]; 1.0 only when it all fits
    cleanup: bool  # it fits only once the cache is released (reserved basis)
    bound: str  # what limits it: "" (nothing), "hard_limit", "device" or "fragmentation"
    cache: CacheState | None


class Fragmentation(NamedTuple):
    """The cache as a large activation sees it (the snapshot's ``fragmentation`` object)."""

    inactive_split_bytes: int  # free inside segments in use: no cleanup returns it
    releasable_bytes: int  # what a cleanup returns now
    largest_free_block_bytes: int  # the large pool's largest cached free block
    largest_allocatable_bytes: int  # the largest single request the allocator can place now
    free_bytes: int  # everything not in live tensors: device room plus the whole cache
    ratio: float  # 1 - largest_allocatable / free: free memory one allocation cannot use
    estimate: bool


class AllocatorModel:
    """Stateless: reads the backend's settings each time (they can change at run time)."""

    def __init__(self, backend: MemoryBackend, basis: str, hard_limit_bytes: int) -> None:
        self._backend = backend
        self._reserved_basis = LIMIT_BASES.index(basis) == 1
        self.hard_limit_bytes = hard_limit_bytes
        self._reservable = backend.reservable_bytes  # bound once: the hot path calls it
        self._settings: AllocatorSettings | None = None
        self._plain_rounding = True
        self._page = 0  # expandable segments' large page; 0 when they are off

    def quick(self, s: AllocatorSample, nbytes: int) -> int:
        """The hot path: the projected usage when the counters alone say that ``nbytes`` fit
        (a new segment has room on the device and under the limit, whatever the cache holds);
        -1 when they cannot tell, and ``request`` must decide. The same arithmetic as
        ``request``'s first lines, written for speed (no verdict object, no calls)."""
        st = self._backend.allocator_settings
        if st is not self._settings:
            self._settings = st
            self._plain_rounding = not any(st.roundup_power2_divisions)
            self._page = st.page_bytes(small=False) if st.expandable_segments else 0
        if nbytes <= 0:
            return -1
        size = ((nbytes + 511) & ~511) if self._plain_rounding else st.round_size(nbytes)
        if self._page:
            page = self._page if size > 1 << 20 else 2 << 20
            new = -(-size // page) * page
        elif size <= 1 << 20:
            new = 2 << 20
        elif size < 10 << 20:
            new = 20 << 20
        else:
            new = (size + (2 << 20) - 1) & ~((2 << 20) - 1)
        grown = s.reserved_bytes + new  # AllocatorSettings.new_bytes, inlined for speed
        if grown > self._reservable():
            return -1
        projected = grown if self._reserved_basis else s.allocated_bytes + size
        return projected if projected <= self.hard_limit_bytes else -1

    # -- one request ------------------------------------------------------------------------

    def request(self, s: AllocatorSample, nbytes: int, *, quick_failed: bool = False) -> Verdict:
        """What ``nbytes`` more would do from the state ``s``. ``quick_failed``: the caller
        already knows that ``quick`` could not tell, so the counters' test is not repeated."""
        hard = self.hard_limit_bytes
        st = self._backend.allocator_settings
        if nbytes == 0:
            usage = s.reserved_bytes if self._reserved_basis else s.allocated_bytes
            return Verdict(usage <= hard, usage, True, False, None)
        size = st.round_size(nbytes)
        if not self._reserved_basis and s.allocated_bytes + size > hard:
            return Verdict(False, s.allocated_bytes + size, True, False, None)  # the limit
        if not quick_failed:
            grown = s.reserved_bytes + st.new_bytes(size)
            if grown <= self._backend.reservable_bytes():  # the counters decide: room for it
                projected = grown if self._reserved_basis else s.allocated_bytes + size
                if projected <= hard:
                    return Verdict(True, projected, True, False, None)
        return self._judged(s, nbytes)

    def _judged(self, s: AllocatorSample, nbytes: int) -> Verdict:
        """The verdict from the backend's answer; a refusal drawn from a conservative answer
        (no cached block counted) is asked again of the cache as it is now."""
        c = self._backend.cache_state(nbytes)
        v = self.judge(s, c)
        if not v.ok and c.conservative:
            v = self.judge(s, self._backend.cache_state(nbytes, fresh=True))
        return v

    def judge(self, s: AllocatorSample, c: CacheState) -> Verdict:
        """The verdict on a request from the cache's answer about it."""
        hard = self.hard_limit_bytes
        reuse = c.reuse_bytes > 0
        # The allocator tries a new segment first, and after releasing its cache once more.
        placeable = (reuse or c.new_bytes <= c.room_bytes
                     or c.new_after_release_bytes <= c.room_bytes + c.releasable_bytes)
        if not self._reserved_basis:
            projected = s.allocated_bytes + c.request_bytes
            return Verdict(placeable and projected <= hard, projected, placeable, False, c)
        reserved = s.reserved_bytes
        if reuse and reserved <= hard:
            return Verdict(True, reserved, True, False, c)
        if not placeable:
            return Verdict(False, reserved + c.new_bytes, False, False, c)
        if not reuse and c.new_bytes <= c.room_bytes and reserved + c.new_bytes <= hard:
            return Verdict(True, reserved + c.new_bytes, True, False, c)
        # Only a release of the cache can make it fit. The allocator releases its whole cache
        # by itself when the device is full; when the limit is what is in the way, the monitor
        # has to release it first. Counted at the worst: the request then takes a new segment.
        new = c.new_after_release_bytes
        after = reserved - c.releasable_bytes + new
        if c.releasable_bytes <= 0 or after > hard or new > c.room_bytes + c.releasable_bytes:
            return Verdict(False, reserved + (0 if reuse else c.new_bytes), True, False, c)
        limit_in_the_way = reserved + (0 if reuse else c.new_bytes) > hard
        return Verdict(True, after, True, limit_in_the_way, c)

    def fit(self, s: AllocatorSample, nbytes: int,
            c: CacheState | None = None) -> tuple[int, Verdict]:
        """The largest request no larger than ``nbytes`` that can be placed under the hard
        limit, and its verdict (checked, not assumed); 0 when nothing can. ``c``: the cache's
        answer about ``nbytes`` when the caller already has it."""
        st = self._backend.allocator_settings
        if c is None or c.conservative:
            # The candidates below come from the cache's largest block: read it as it is.
            c = self._backend.cache_state(nbytes, fresh=True)
        hard = self.hard_limit_bytes
        candidates = []
        block = self._settled_block(st, c)
        if block and (not self._reserved_basis or s.reserved_bytes <= hard):
            candidates.append(block)  # taken from the cache: reserved does not grow
        # A new segment: the device's room once the cache is released bounds it, and on the
        # reserved basis the limit too.
        room = c.room_bytes + c.releasable_bytes
        if self._reserved_basis:
            room = min(room, hard - (s.reserved_bytes - c.releasable_bytes))
        step = _segment_step(st)
        candidates.append(max(0, room) // step * step)
        best = max(candidates)
        if not self._reserved_basis:
            best = min(best, hard - s.allocated_bytes)
        best = _round_down(st, min(best, st.round_size(nbytes)), nbytes)
        for _ in range(24):  # a candidate the check refuses is shrunk by an eighth
            if best <= 0:
                break
            v = self._judged(s, best)
            if v.ok:
                return best, v
            best = _round_down(st, best - max(MIN_BLOCK, best // 8), best)
        return 0, self.judge(s, c)

    @staticmethod
    def _settled_block(st: AllocatorSettings, c: CacheState) -> int:
        """The most a request may take from the largest cached block without a new segment."""
        block = c.largest_free_block_bytes
        if block <= 0:
            return 0
        mss = st.max_split_size_bytes
        return block if block < mss else 0  # an oversize block serves only near-equal sizes

    # -- a slot ----------------------------------------------------------------------------

    def slot(self, s: AllocatorSample, activation: int, *, cleanup_allowed: bool) -> SlotVerdict:
        """A slot whose activations take ``activation`` bytes above the current level, made of
        allocations small enough to reuse the cache (one larger than every cached block is
        judged when it is asked for, by ``check_allocation``/``fit_allocation``)."""
        hard = self.hard_limit_bytes
        allocated, reserved = s.allocated_bytes, s.reserved_bytes
        reservable = self._backend.reservable_bytes()
        # Counters only: the whole activation in new segments has room and stays under.
        worst = reserved + activation
        if worst <= reservable:
            peak = max(reserved, allocated + activation) if self._reserved_basis \
                else allocated + activation
            if peak <= hard:
                return SlotVerdict(peak, 1.0, False, "", None)
        # A cleanup's share decides only when one is allowed; then read it as it is.
        c = self._backend.cache_state(0, fresh=cleanup_allowed)
        releasable = c.releasable_bytes if cleanup_allowed else 0
        device_room = c.room_bytes + reserved - allocated  # new segments, and the whole cache
        cleanup = False
        if self._reserved_basis:
            floor = reserved - releasable  # what no cleanup can lower
            if floor > hard:
                bound = ("fragmentation" if reserved - c.releasable_bytes > hard
                         else "cleanup_disabled")
                return SlotVerdict(reserved, 0.0, False, bound, c)
            peak = max(reserved, allocated + activation)
            if peak > hard and max(floor, allocated + activation) <= hard:
                peak, cleanup = max(floor, allocated + activation), True
        else:
            peak = allocated + activation
        limit_share = _share(hard - allocated, activation)
        device_share = _share(device_room, activation)
        if peak <= hard and device_share >= 1.0:
            return SlotVerdict(peak, 1.0, cleanup, "", c)
        bound = "device" if device_share < limit_share else "hard_limit"
        return SlotVerdict(peak, min(limit_share, device_share), False, bound, c)

    # -- cleanups and views -------------------------------------------------------------

    def cache(self) -> CacheState:
        """The cache as it is: ``releasable_bytes`` is what a cleanup would return now, read
        exactly (a cleanup is decided on it)."""
        return self._backend.cache_state(0, fresh=True)

    def fragmentation(self, s: AllocatorSample, c: CacheState | None = None) -> Fragmentation:
        """For dashboards: from ``cache_view`` unless ``c`` is given. ``estimate`` when the
        figures may not be the allocator's own: the backend's view is older than its counters
        (or counted no cached block), or under expandable segments, where the largest request
        may grow a free tail, or land in a gap a release would open, which this summary does
        not follow."""
        if c is None:
            c = self._backend.cache_view()
        st = self._backend.allocator_settings
        largest = max(_largest_request(st, c.largest_free_block_bytes),
                      _largest_new_request(st, c.room_bytes + c.releasable_bytes))
        free = c.room_bytes + max(0, s.reserved_bytes - s.allocated_bytes)
        # Against what one allocation could get were the memory in one piece: the free bytes
        # in whole segment steps, so that a healthy card reads 0.
        whole = free // _segment_step(st) * _segment_step(st)
        ratio = round(1 - min(largest, whole) / whole, 4) if whole > 0 else 0.0
        # At 1 MiB and below a request goes to the small pool, whose blocks are not summed up.
        estimate = c.estimate or c.conservative or c.expandable or largest <= SMALL_SIZE
        return Fragmentation(c.inactive_split_bytes, c.releasable_bytes,
                             c.largest_free_block_bytes, largest, free, ratio, estimate)


def _largest_request(st: AllocatorSettings, block: int) -> int:
    """The largest request a cached block of the large pool serves: every block serves one
    its own size once rounded (an oversize block too: it is within the rounding of itself)."""
    return _round_down(st, block, block) if block > SMALL_SIZE else 0


def _largest_new_request(st: AllocatorSettings, room: int) -> int:
    """The largest request whose new segment fits ``room``: from 10 MiB a segment is the
    request rounded to 2 MiB; below, the 20 MiB (``large_segment_size_mb``) segment, and the
    small pool's 2 MiB one for a request up to 1 MiB."""
    if st.expandable_segments:
        page = st.page_bytes(small=False)
        return _round_down(st, room // page * page, room // page * page)
    segment = room // ROUND_LARGE * ROUND_LARGE
    largest = _round_down(st, segment, segment)
    if largest >= MIN_LARGE_ALLOC:
        return largest
    # (room is below the large segment here: a 1-10 MiB request cannot have one either)
    return SMALL_SIZE if room >= SMALL_BUFFER else 0


def _segment_step(st: AllocatorSettings) -> int:
    """The granularity of what a new large allocation reserves."""
    return st.page_bytes(small=False) if st.expandable_segments else 2 << 20


def _round_down(st: AllocatorSettings, bound: int, nbytes: int) -> int:
    """The largest request <= min(bound, nbytes) whose rounded block is <= bound."""
    n = min(bound, nbytes)
    if n <= 0:
        return 0
    if st.round_size(n) <= bound:
        return n
    div = st.divisions(n)
    floor = 1 << (n.bit_length() - 1)
    step = max(MIN_BLOCK, floor // div) if div > 1 else MIN_BLOCK
    n = n // step * step
    return n if n > 0 and st.round_size(n) <= bound else 0


def _share(room: int, activation: int) -> float:
    if activation <= 0:
        return 1.0 if room >= 0 else 0.0
    return min(1.0, max(0.0, room / activation))
