"""Cleanups requested from other threads run on the generation thread, at its boundaries."""

from __future__ import annotations

import threading

import pytest

from app import CleanupCooldownError, SimulatedBackend, VRAMMonitor
from tests.conftest import GB


class ThreadRecordingCard(SimulatedBackend):
    """Notes which thread ran each empty_cache, and can fail it."""

    def __init__(self) -> None:
        super().__init__(12 * GB)
        self.cleanup_threads: list[str] = []

    def empty_cache(self) -> None:
        super().empty_cache()
        self.cleanup_threads.append(threading.current_thread().name)


@pytest.fixture
def card() -> ThreadRecordingCard:
    return ThreadRecordingCard()


class GenerationThread(threading.Thread):
    """Runs one slot: enters it, signals ``inside``, then calls ``body`` until ``release``."""

    def __init__(self, monitor: VRAMMonitor, body=None, raises: bool = False) -> None:
        super().__init__(name="generation", daemon=True)
        self.monitor, self.body, self.raises = monitor, body, raises
        self.inside, self.release = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.monitor.generation(7):
                self.inside.set()
                while not self.release.is_set():
                    if self.body is None:
                        self.release.wait()  # a long kernel: no boundary until released
                    else:
                        self.body()
                if self.raises:
                    raise KeyError("the slot failed")
        except BaseException as exc:
            self.error = exc


def _start(thread: GenerationThread) -> GenerationThread:
    thread.start()
    assert thread.inside.wait(10)
    return thread


def test_with_no_generation_running_it_runs_at_once_on_the_caller(card):
    monitor = VRAMMonitor(backend=card)
    card.free(card.allocate(50 << 20))
    result = monitor.request_cleanup("http", wait_s=0)
    assert result is not None and result.freed_bytes == 50 << 20
    assert card.cleanup_threads == ["MainThread"]


def test_the_generation_thread_carries_it_out_at_its_next_guard_call(card):
    monitor = VRAMMonitor(backend=card)
    gen = _start(GenerationThread(monitor, body=lambda: monitor.check_limits("loop")))
    try:
        result = monitor.request_cleanup("http", wait_s=10)
    finally:
        gen.release.set()
        gen.join(10)
    assert result is not None and result.reason == "http"
    assert card.cleanup_threads == ["generation"]
    assert gen.error is None


def test_a_loop_without_a_boundary_gets_202_and_one_cleanup_at_the_slot_end(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=30)
    gen = _start(GenerationThread(monitor))
    answers = [monitor.request_cleanup("http", wait_s=0.05) for _ in range(5)]
    assert answers == [None] * 5  # scheduled, each time
    assert card.cleanup_threads == []  # nothing ran on this thread
    gen.release.set()
    gen.join(10)
    assert card.cleanup_threads == ["generation"]  # once, however many asked
    assert monitor.counters().emergency_cleanups == 1
    with pytest.raises(CleanupCooldownError):  # and it started the clock
        monitor.request_cleanup("http", wait_s=0)


def test_a_slot_that_raises_still_runs_the_pending_cleanup(card):
    monitor = VRAMMonitor(backend=card)
    gen = _start(GenerationThread(monitor, raises=True))
    assert monitor.request_cleanup("http", wait_s=0.01) is None
    gen.release.set()
    gen.join(10)
    assert isinstance(gen.error, KeyError)  # the slot's own error, untouched
    assert card.cleanup_threads == ["generation"]


def test_a_stage_boundary_runs_it(card):
    monitor = VRAMMonitor(backend=card)
    entered_stage = threading.Event()

    def body() -> None:
        with monitor.stage("flux"):
            entered_stage.set()

    gen = _start(GenerationThread(monitor, body=body))
    try:
        assert entered_stage.wait(10)
        assert monitor.request_cleanup("http", wait_s=10) is not None
    finally:
        gen.release.set()
        gen.join(10)
    assert card.cleanup_threads == ["generation"]


def test_asked_from_the_generation_thread_it_runs_at_once(card):
    monitor = VRAMMonitor(backend=card)
    with monitor.generation(1):
        assert monitor.request_cleanup("http", wait_s=0) is not None
        assert card.cleanup_threads == ["MainThread"]


def test_a_failing_pending_cleanup_reaches_the_requester_not_the_slot(card):
    monitor = VRAMMonitor(backend=card)
    gen = _start(GenerationThread(monitor, body=lambda: monitor.check_limits()))
    card.set_faults(empty_cache=True)
    try:
        with pytest.raises(RuntimeError, match="empty_cache failed"):
            monitor.request_cleanup("http", wait_s=10)
    finally:
        gen.release.set()
        gen.join(10)
    assert gen.error is None
    assert monitor.counters().cleanup_failures == 1
    card.set_faults()
    assert monitor.request_cleanup("http", wait_s=0) is not None  # the clock was not claimed


def test_requests_racing_slot_ends_are_never_lost(card):
    """Slots start and end as fast as they can while requests arrive: every request either
    runs at once or is carried out by a slot's end; none waits forever."""
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    stop = threading.Event()

    def loop() -> None:
        slot = 0
        while not stop.is_set():
            slot += 1
            with monitor.generation(slot):
                pass

    gen = threading.Thread(target=loop, name="generation", daemon=True)
    gen.start()
    try:
        answers = [monitor.request_cleanup("http", wait_s=10) for _ in range(40)]
    finally:
        stop.set()
        gen.join(10)
    assert all(a is not None for a in answers)
    assert monitor.counters().emergency_cleanups == len(card.cleanup_threads) <= 40


# ---------------------------------------------------- issue 25 (9): a cleanup begun between slots


class SlowCleanupCard(ThreadRecordingCard):
    """``empty_cache`` holds until ``release``; notes each read or allocation the generation
    thread makes while one runs."""

    def __init__(self) -> None:
        super().__init__()
        self.cleaning, self.release = threading.Event(), threading.Event()
        self.beside: list[str] = []

    def empty_cache(self) -> None:
        self.cleaning.set()
        try:
            assert self.release.wait(10)
            super().empty_cache()
        finally:
            self.cleaning.clear()

    def _note(self, what: str) -> None:
        if threading.current_thread().name == "generation" and self.cleaning.is_set():
            self.beside.append(what)

    def sample(self):
        self._note("sample")
        return super().sample()

    def allocate(self, nbytes: int) -> int:
        self._note("allocate")
        return super().allocate(nbytes)


def _idle_cleanup(monitor: VRAMMonitor, card: SlowCleanupCard) -> threading.Thread:
    """A POST /vram/cleanup between slots, caught inside its empty_cache."""
    card.free(card.allocate(50 << 20))
    http = threading.Thread(target=monitor.request_cleanup, args=("http",), name="http",
                            daemon=True)
    http.start()
    assert card.cleaning.wait(10)
    return http


def test_a_slot_starting_during_an_idle_cleanup_waits_for_it_from_its_first_read():
    card = SlowCleanupCard()
    monitor = VRAMMonitor(backend=card)
    http = _idle_cleanup(monitor, card)
    gen = GenerationThread(monitor, body=lambda: card.free(card.allocate(1 << 20)))
    gen.start()
    assert not gen.inside.wait(0.2)  # held at its start while empty_cache runs
    card.release.set()
    assert gen.inside.wait(10)
    gen.release.set()
    gen.join(10)
    http.join(10)
    assert card.beside == []  # not even the slot's first read ran beside empty_cache
    assert gen.error is None and card.cleanup_threads == ["http"]


class HeldReadCard(ThreadRecordingCard):
    """The generation thread's first read holds until ``release``: a slot caught at its very
    start."""

    def __init__(self) -> None:
        super().__init__()
        self.reading, self.release = threading.Event(), threading.Event()

    def sample(self):
        if threading.current_thread().name == "generation" and not self.reading.is_set():
            self.reading.set()
            assert self.release.wait(10)
        return super().sample()


def test_no_idle_cleanup_starts_once_a_slot_has_started():
    card = HeldReadCard()
    monitor = VRAMMonitor(backend=card)
    gen = GenerationThread(monitor)
    gen.start()
    assert card.reading.wait(10)  # the slot has started: its first read is under way
    try:
        assert monitor.request_cleanup("http", wait_s=0) is None  # scheduled, not run here
        assert card.cleanup_threads == []
    finally:
        card.release.set()
        assert gen.inside.wait(10)
        gen.release.set()
        gen.join(10)
    assert card.cleanup_threads == ["generation"]  # at the slot's end, on its thread


def test_a_slot_waits_for_an_idle_cleanup_no_longer_than_cleanup_wait_s(caplog):
    card = SlowCleanupCard()
    monitor = VRAMMonitor(backend=card, cleanup_wait_s=0.05)
    http = _idle_cleanup(monitor, card)
    gen = GenerationThread(monitor)
    try:
        gen.start()
        assert gen.inside.wait(10)  # empty_cache is stuck: the slot starts after the bound
        assert card.cleaning.is_set()
    finally:
        card.release.set()
        gen.release.set()
        gen.join(10)
        http.join(10)
    assert any("cleanup_wait_s" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
