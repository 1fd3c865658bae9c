"""SimulatedBackend.capture(): real PyTorch code on the meta device, placed on the simulated
card by the caching allocator's rules."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from app import AccountingWarning, SimulatedBackend, VRAMMonitor
from app.backends.alloc_conf import MIN_BLOCK
from app.backends.capture import AllocationTrace

GB = 1_000_000_000
MiB = 1 << 20


def _encoder(layers: int = 4, width: int = 256) -> torch.nn.Module:
    with torch.device("meta"):
        layer = torch.nn.TransformerEncoderLayer(width, 8, 4 * width, batch_first=True)
        return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _rounded(nbytes: int) -> int:
    return max(MIN_BLOCK, (nbytes + MIN_BLOCK - 1) // MIN_BLOCK * MIN_BLOCK)


def test_a_module_built_inside_is_resident_at_its_parameter_bytes(card: SimulatedBackend):
    with card.capture():
        module = _encoder()
    params = list(module.parameters())
    allocated = card.sample().allocated_bytes
    # within the allocator's 512-byte rounding of each parameter, and never below
    assert _param_bytes(module) <= allocated <= sum(
        _rounded(p.numel() * p.element_size()) for p in params)
    assert allocated > 0


def test_register_model_counts_a_meta_module_by_storage_identity(card: SimulatedBackend):
    monitor = VRAMMonitor(backend=card)
    with card.capture():
        module = _encoder()
    # every meta storage has data_ptr() 0: de-duplicating by it counted one tensor
    assert monitor.register_model("kokoro", module) == _param_bytes(module)


def test_track_model_load_measures_a_model_built_inside(card: SimulatedBackend):
    monitor = VRAMMonitor(backend=card)
    with monitor.track_model_load("clip_b"), card.capture():
        module = _encoder()
    (record,) = monitor.models()
    assert record.vram_bytes == card.sample().allocated_bytes >= _param_bytes(module)


def test_nothing_counts_outside_a_capture(card: SimulatedBackend):
    with torch.device("meta"):
        module = torch.nn.Linear(4096, 4096)
    out = module(torch.empty(8, 4096, device="meta"))
    assert out.shape == (8, 4096)
    assert card.sample().allocated_bytes == 0
    with pytest.warns(AccountingWarning, match=r"register_model\('outside'\): none of the "
                      r"module's 67,125,248 bytes of tensors \(on meta\) were placed by sim:0"):
        assert VRAMMonitor(backend=card).register_model("outside", module) == 0


def test_storages_from_before_the_capture_are_never_charged(card: SimulatedBackend):
    with torch.device("meta"):
        module = torch.nn.Linear(1024, 1024)
    with card.capture():
        # aten.t of the weight is the first sight of its storage: a view, not a new block
        weight_t = module.weight.t()
        module.weight.data.mul_(2)
    assert weight_t.untyped_storage().nbytes() == 1024 * 1024 * 4
    assert card.sample().allocated_bytes == 0


def test_views_cost_nothing(card: SimulatedBackend):
    with card.capture():
        base = torch.empty(1024, 1024, device="meta")
        after_base = card.sample().allocated_bytes
        views = [base.t(), base.view(-1), base[:10], base.unsqueeze(0), base.transpose(0, 1)]
        base.add_(1)
    assert after_base == 1024 * 1024 * 4
    assert card.sample().allocated_bytes == after_base
    del base
    assert card.sample().allocated_bytes == after_base  # the views hold the block
    del views
    assert card.sample().allocated_bytes == 0


def test_a_forward_pass_has_a_real_peak_and_leaves_nothing_behind(card: SimulatedBackend):
    with card.capture(), torch.no_grad():
        module = _encoder()
        module(torch.empty(1, 1, 256, device="meta"))  # a warm-up: cuBLAS's workspace stays
    resident = card.sample().allocated_bytes
    card.reset_peak()
    x_bytes = 4 * 257 * 256 * 4
    with torch.no_grad(), card.capture(record=True) as capture:
        x = torch.empty(4, 257, 256, device="meta")
        y = module(x)
        assert card.sample().allocated_bytes == resident + x_bytes + y.untyped_storage().nbytes()
        del x, y
    sample = card.sample()
    assert sample.allocated_bytes == resident
    # the activations of a layer: the feed-forward's [4, 257, 1024] fp32 at least
    assert sample.peak_allocated_bytes - resident >= 4 * 257 * 1024 * 4 + x_bytes
    trace = capture.trace()
    assert trace.allocations > 50  # thousands of tensors on a real model: here, tens
    # the trace holds the requests, the card their 512-byte rounding
    assert 0 <= sample.peak_allocated_bytes - resident - trace.peak_bytes() < 512 * 8


def test_an_oom_comes_from_the_op_that_allocates():
    card = SimulatedBackend(1 * GB)
    with card.capture():
        keep = torch.empty(600 * MiB, dtype=torch.uint8, device="meta")
        a = torch.empty(300 * MiB, dtype=torch.uint8, device="meta")
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as info:
            torch.cat([a, a])  # 600 MiB more: the cat's output
        assert any(frame.name == "test_an_oom_comes_from_the_op_that_allocates"
                   for frame in info.traceback)
    assert card.sample().allocated_bytes == 900 * MiB
    assert card.sample().num_ooms == 1
    del keep, a, info  # the traceback holds the op's inputs, as it would on a real card
    assert card.sample().allocated_bytes == 0


def test_a_storage_that_grows_is_placed_again(card: SimulatedBackend):
    with card.capture(record=True) as capture:
        t = torch.empty(0, device="meta")  # zero bytes: tracked, since resize_ can grow it
        assert card.sample().allocated_bytes == 0
        t.resize_(1 << 20)
        assert card.sample().allocated_bytes == 4 << 20
        out = torch.empty(0, device="meta")
        torch.add(torch.ones(1 << 18, device="meta"), 1, out=out)
        assert card.sample().allocated_bytes == (4 << 20) + (1 << 20)  # out grew; ones died
    del t, out
    assert card.sample().allocated_bytes == 0
    assert capture.trace().allocations == 5  # t, t grown, out, ones, out grown


def test_a_storage_dying_inside_the_collector_with_the_lock_held_does_not_deadlock(
        card: SimulatedBackend):
    with card.capture():
        cycle: list[object] = [torch.empty(MiB, dtype=torch.uint8, device="meta")]
        cycle.append(cycle)  # only the garbage collector frees it
    del cycle
    assert card.sample().allocated_bytes == MiB
    # the collector runs while the card's lock is held on this thread, as it can inside
    # any allocation; the death is queued, not freed there
    done = threading.Event()

    def collect_with_lock_held() -> None:
        with card._lock:
            gc.collect()
        done.set()

    worker = threading.Thread(target=collect_with_lock_held, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set(), "deadlocked: a finalizer freed with the lock held"
    assert card.sample().allocated_bytes == 0  # the queue is freed before the next read


def test_a_capture_follows_only_its_own_thread(card: SimulatedBackend):
    made: list[torch.Tensor] = []
    with card.capture():
        worker = threading.Thread(
            target=lambda: made.append(torch.empty(MiB, dtype=torch.uint8, device="meta")))
        with pytest.warns(AccountingWarning, match="charged to no card"):  # and said so
            worker.start()
            worker.join()
        assert card.sample().allocated_bytes == 0  # documented: dispatch modes are per thread
        mine = torch.empty(MiB, dtype=torch.uint8, device="meta")
    assert card.sample().allocated_bytes == MiB
    del mine


def test_two_captures_charge_a_storage_once(card: SimulatedBackend):
    with card.capture(), card.capture():
        t = torch.empty(MiB, dtype=torch.uint8, device="meta")
    assert card.sample().allocated_bytes == MiB
    del t
    assert card.sample().allocated_bytes == 0


def test_the_guards_and_generations_see_a_captured_forward(card: SimulatedBackend):
    monitor = VRAMMonitor(backend=card)
    with monitor.track_model_load("encoder"), card.capture(), torch.no_grad():
        module = _encoder()
        module(torch.empty(1, 1, 256, device="meta"))  # a warm-up: cuBLAS's workspace stays
    with torch.no_grad(), card.capture(), monitor.generation(1) as record:
        with monitor.stage("encode"):
            monitor.check_allocation(64 * MiB, "encode")
            y = module(torch.empty(2, 128, 256, device="meta"))
            monitor.check_limits("encode")
        del y
    assert record.delta_bytes == 0
    assert record.peak_bytes > card.sample().allocated_bytes


def test_a_trace_replays_to_the_same_peak():
    recorder, player = SimulatedBackend(12 * GB), SimulatedBackend(12 * GB)
    with recorder.capture(), torch.no_grad():
        module = _encoder()
        # a warm-up places cuBLAS's workspace, the card's, which no trace holds
        module(torch.empty(1, 1, 256, device="meta"))
    resident = recorder.sample().allocated_bytes
    recorder.reset_peak()
    with torch.no_grad(), recorder.capture(record=True) as capture:
        capture.mark("first")
        y = module(torch.empty(2, 64, 256, device="meta"))
        capture.mark("second")
        z = module(y)
        del y
    trace = capture.trace()
    assert [name for name, _ in trace.parts()] == ["first", "second"]
    handles: list[int] = []
    for event in trace.events:
        if event >= 0:
            handles.append(player.allocate(event))
        else:
            player.free(handles[~event])
    assert player.sample().allocated_bytes == recorder.sample().allocated_bytes - resident
    assert player.sample().peak_allocated_bytes == (
        recorder.sample().peak_allocated_bytes - resident)
    del z


def test_a_trace_knows_its_parts():
    trace = AllocationTrace((10, 20, ~0, 5, ~1), (("a", 0), ("b", 3)))
    assert list(trace.parts()) == [("a", (10, 20, ~0)), ("b", (5, ~1))]
    assert trace.allocations == 3
    assert trace.peak_bytes() == 30


def test_a_recording_capture_inside_an_open_one_records_what_a_lone_one_does():
    """Issue 25 (4): the README's pattern, a recording capture inside the capture the model
    was loaded in, recorded nothing (the outer capture charged every storage first), and a
    replay of the empty trace "fitted". Nested, it rides on the open capture: the same
    events as alone, one workspace a convolution, and a record inside a record fills both."""
    from app.backends import simulated_rtx_3060
    from app.backends.capture import as_loaded

    def step(x):
        return torch.nn.functional.silu(conv(x)).sum()

    lone = simulated_rtx_3060()
    with lone.capture():
        conv = as_loaded(lambda: torch.nn.Conv2d(8, 8, 3, padding=1))
    with lone.capture(record=True) as alone:
        step(torch.empty(1, 8, 64, 64, device="meta"))
    card = simulated_rtx_3060()
    with card.capture():
        conv = as_loaded(lambda: torch.nn.Conv2d(8, 8, 3, padding=1))
        calls = card.memory_stats()["allocation.all.allocated"]
        with card.capture(record=True) as nested:
            step(torch.empty(1, 8, 64, 64, device="meta"))
        placed = card.memory_stats()["allocation.all.allocated"] - calls
        with card.capture(record=True) as outer:
            with card.capture(record=True) as inner:
                step(torch.empty(1, 8, 64, 64, device="meta"))
    assert alone.trace().events and nested.trace() == alone.trace()
    assert inner.trace() == outer.trace() == alone.trace()
    assert placed == alone.trace().allocations  # each storage and workspace placed once
    assert nested.trace().optional  # the convolution's workspace, once


def test_a_model_built_outside_the_capture_is_no_silent_zero():
    """Issue 25 (3): a model built outside the capture (or loaded by as_loaded outside it)
    registered 0.0 GB against its budget with no word, and the pipeline looked as if it fit."""
    from app.backends import simulated_rtx_3060
    from app.backends.capture import as_loaded

    def build():
        with torch.device("meta"):
            return torch.nn.Linear(4096, 4096)

    card = simulated_rtx_3060()
    monitor = VRAMMonitor(backend=card)
    with pytest.warns(AccountingWarning, match=r"model 'unet' added 0 bytes to sim:0 while it "
                      r"loaded.*Build it inside card\.capture\(\), through as_loaded"):
        with monitor.track_model_load("unet", budget_gb=1.8):
            as_loaded(build)  # outside any capture
    with card.capture(), monitor.track_model_load("unet2", budget_gb=1.8):
        kept = as_loaded(build)  # inside: placed, and no warning (warnings are errors here)
    assert monitor.models()[1].vram_bytes >= 4096 * 4096 * 4
    assert kept is not None


def test_the_card_owns_what_it_placed_and_not_a_cpu_module():
    """Issue 25 (3): owns() said yes to every CPU tensor, so a 134 MB CPU module registered
    0.134 GB while the card held 0 B."""
    card = SimulatedBackend(12 * 10**9)
    cpu = torch.nn.Linear(4096, 8192)  # 134 MB of fp32 on the CPU
    assert not card.owns(cpu.weight)
    with pytest.warns(AccountingWarning, match=r"none of the module's 134,250,496 bytes of "
                      r"tensors \(on cpu\) were placed by sim:0"):
        assert VRAMMonitor(backend=card).register_model("cpu", cpu) == 0
    with card.capture():
        on_card = as_loaded_linear()
    assert card.owns(on_card.weight)
    told = SimulatedBackend(12 * 10**9, torch_device="cpu")  # CPU tensors stand for the card's
    assert told.owns(cpu.weight)


def as_loaded_linear() -> torch.nn.Module:
    from app.backends.capture import as_loaded

    def build():
        with torch.device("meta"):
            return torch.nn.Linear(64, 64)

    return as_loaded(build)


def test_a_forward_on_a_thread_the_capture_does_not_follow_is_no_silent_zero(recwarn):
    """Issue 25 (3): a capture entered on one thread charges nothing made on another, and
    said nothing. A thread started while a capture is open now warns, once, at its first
    meta tensor; one that enters its own capture is charged, and says nothing."""
    import warnings

    from app.backends import simulated_rtx_3060

    card = simulated_rtx_3060()
    errors: list[BaseException] = []

    def forward(capture_here: bool) -> None:
        try:
            if capture_here:
                with card.capture():
                    torch.empty(1 << 20, device="meta").add(1)
            else:
                for _ in range(3):
                    torch.empty(1 << 20, device="meta").add(1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", AccountingWarning)
        with card.capture():
            for name, here in (("worker", False), ("capturing worker", True)):
                t = threading.Thread(target=forward, args=(here,), name=name)
                t.start()
                t.join()
    assert not errors
    messages = [str(w.message) for w in seen if w.category is AccountingWarning]
    assert messages == [
        "a meta tensor was made on thread 'worker' while a capture is open on thread "
        "'MainThread' only: it is charged to no card (PyTorch keeps dispatch modes per "
        "thread). Enter card.capture() on this thread too"]
    assert card.memory_stats()["allocation.all.allocated"] > 0  # the capturing worker's
    assert threading.getprofile() is None  # the watch is gone with the last capture
