"""Issue 17: the defects a review of the landed main reproduced, each with the test that shows
it, written before the fix."""

from __future__ import annotations

import math
import warnings

import pytest

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor
from app.errors import MemoryLeakWarning
from tests.conftest import GB, MB

MiB = 1 << 20


# ------------------------------------------------------- 2. leak detection and model swaps


def run_slots(monitor, card, slots, *, leak=0, swap_at=None, lazy_at=None) -> int:
    """Run ``slots`` slots that each keep ``leak`` bytes; returns the leak warnings."""
    lora = None
    if swap_at is not None:
        with monitor.track_model_load("lora-a"):
            lora = card.allocate(150 * MB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryLeakWarning)
        for slot in range(slots):
            if slot == swap_at:
                monitor.unregister_model("lora-a")
                card.free(lora)
                with monitor.track_model_load("lora-b"):
                    card.allocate(120 * MB)
            with monitor.generation(slot):
                card.free(card.allocate(200 * MB))  # the slot's activations
                if slot == lazy_at:
                    with monitor.track_model_load("kokoro"):
                        card.allocate(400 * MB)
                if leak:
                    card.allocate(leak)
    return monitor.counters().leak_warnings


def fresh() -> tuple[VRAMMonitor, SimulatedBackend]:
    card = SimulatedBackend(12 * GB)
    card.allocate(9 * GB)
    return VRAMMonitor(backend=card, python_warnings=False), card


def test_a_lora_swap_changes_nothing_in_what_is_reported():
    without = run_slots(*fresh(), 1000, leak=500_000)
    assert without >= 3  # a 0.5 MB/slot leak is reported, every 100 MB or so
    assert run_slots(*fresh(), 1000, leak=500_000, swap_at=50) == without


@pytest.mark.parametrize("slot", [0, 1, 100, 101])
def test_a_model_loaded_lazily_inside_a_slot_is_not_a_leak(slot):
    assert run_slots(*fresh(), 400, lazy_at=slot) == 0


def test_a_swap_without_a_leak_reports_nothing():
    assert run_slots(*fresh(), 400, swap_at=50) == 0


# ----------------------------------------------------------- 5. fit_allocation never 0


class FlakyCache(SimulatedBackend):
    """empty_cache fails once, then works: the review's sequence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures = 1

    def empty_cache(self) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("simulated fault: empty_cache failed")
        super().empty_cache()


def test_fit_allocation_returns_at_least_the_fraction_or_raises():
    card = FlakyCache(12 * GB)
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0)
    card.allocate(10 * GB)
    card.free(card.allocate(int(1.4 * GB)))  # reserved 11.4 GB, 1.4 GB of it releasable
    for _ in range(3):
        try:
            n = monitor.fit_allocation(GB, "latents", min_fraction=0.5)
        except MemoryPressureError:
            continue
        assert n >= 0.5 * GB


# ---------------------------------------------------------------- 6. sizes are checked


@pytest.mark.parametrize("bad, error", [
    (math.nan, ValueError), (math.inf, ValueError), (-1, ValueError), (1.5, ValueError),
    ("1GB", TypeError), (None, TypeError), (True, TypeError),
])
@pytest.mark.parametrize("guard", ["check_allocation", "fit_allocation"])
def test_a_bad_size_is_an_error_that_names_it_and_counts_nothing(monitor, bad, error, guard):
    with pytest.raises(error, match="requested_bytes"):
        getattr(monitor, guard)(bad)
    assert monitor.hard_limit_violations == 0


def test_a_size_is_an_int_inside(monitor):
    assert type(monitor.check_allocation(1.5e9)) is int
    assert monitor.fit_allocation(1.5e9) == 1_500_000_000
    assert type(monitor.fit_allocation(1.5e9)) is int


# ------------------------------------------------ 3, 4. cleanups and the generation thread


def test_a_cleanup_asked_for_on_the_generation_thread_answers_the_waiting_one_too(card):
    import threading

    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0, cleanup_wait_s=30)
    card.free(card.allocate(100 * MB))
    answers = []
    with monitor.generation(1):
        http = threading.Thread(target=lambda: answers.append(monitor.request_cleanup("http")))
        http.start()
        for _ in range(5000):  # until the HTTP request is registered (at most 5 s)
            if monitor._cleanups.pending is not None:
                break
            threading.Event().wait(0.001)
        mine = monitor.request_cleanup("http")  # from the generation thread: at once
        http.join(5)
    assert mine is not None and mine.freed_bytes > 0
    assert answers == [mine]  # the same cleanup answered both
    assert monitor.emergency_cleanups == 1


class BlockingCache(SimulatedBackend):
    """empty_cache waits until released, and says when it starts and ends."""

    def __init__(self, *args, **kwargs) -> None:
        import threading

        super().__init__(*args, **kwargs)
        self.started, self.release = threading.Event(), threading.Event()
        self.events: list[str] = []

    def empty_cache(self) -> None:
        self.started.set()
        self.release.wait(10)
        super().empty_cache()
        self.events.append("empty_cache ended")


def test_a_cleanup_started_between_slots_ends_before_the_next_slot_begins():
    import threading

    card = BlockingCache(12 * GB)
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    http = threading.Thread(target=monitor.request_cleanup, args=("http",))
    http.start()
    assert card.started.wait(5)  # the HTTP thread's cleanup is inside empty_cache
    entered = threading.Event()

    def slot() -> None:
        with monitor.generation(1):
            card.events.append("slot began")
            entered.set()

    director = threading.Thread(target=slot)
    director.start()
    assert not entered.wait(0.2)  # the slot waits for the cleanup
    card.release.set()
    director.join(5)
    http.join(5)
    assert card.events == ["empty_cache ended", "slot began"]


# ------------------------------------------------- 9. admission with varying stage names


def test_the_forecast_keeps_the_most_recent_stage_names_only(card):
    from app.monitor.admission import MAX_STAGES

    monitor = VRAMMonitor(backend=card)
    for slot in range(300):
        with monitor.generation(slot), monitor.stage("flux"), monitor.stage(f"chunk {slot}"):
            card.free(card.allocate(MiB))
    stages = monitor.forecast().stage_bytes
    assert len(stages) == MAX_STAGES
    assert "flux" in stages and "chunk 299" in stages and "chunk 0" not in stages
    assert monitor.admit(300).decision == "admit"


# ------------------------------------------------------------- 7. huge settings, one rule


@pytest.mark.parametrize("name, value", [("VORTEX_HARD_LIMIT_GB", "1e300"),
                                         ("VORTEX_LEAK_THRESHOLD_MB", "1e305"),
                                         ("VORTEX_CLEANUP_WAIT_S", "1e300"),
                                         ("VORTEX_SOFT_LIMIT_GB", "inf")])
def test_a_huge_setting_is_one_line_naming_the_variable(monkeypatch, name, value):
    from app.config import SettingsError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    assert name in text and "\n" not in text


def test_the_monitor_and_the_settings_share_their_rules(monkeypatch):
    from app.config import SettingsError, load_settings

    with pytest.raises(ValueError, match="hard_limit_gb=1e\\+300 must be at most"):
        VRAMMonitor(backend=SimulatedBackend(GB), hard_limit_gb=1e300)
    monkeypatch.setenv("VORTEX_SOFT_LIMIT_GB", "12")
    with pytest.raises(SettingsError, match="VORTEX_HARD_LIMIT_GB: must be above "
                                            "VORTEX_SOFT_LIMIT_GB"):
        load_settings()


# ------------------------------------------------ 8. the HTTP middleware and the lifespan


def test_the_control_plane_runs_its_lifespan(monitor):
    """What uvicorn with lifespan="on" (or an embedding app) sends first: the middleware must
    pass a scope without a path through."""
    import asyncio

    from app.api.main import create_app

    app = create_app(monitor)
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive():
        return inbox.pop(0)

    async def send(message):
        sent.append(message["type"])

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                    receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# ------------------------------------------ found by the fragmentation benchmark (seed 14)


def test_skipping_cannot_lock_the_director_out_when_the_history_is_alike(card):
    card.allocate(int(10.8 * GB))
    monitor = VRAMMonitor(backend=card, python_warnings=False)
    with pytest.raises(MemoryPressureError), monitor.generation(1), monitor.stage("flux"):
        monitor.check_allocation(int(1.5 * GB))  # one refused slot: the only history
    for slot in range(2, 40):
        a = monitor.admit(slot)
        if a.decision == "refuse" and a.activation_scale < 0.5:
            monitor.skip_slot(slot)
            continue
        break  # the Director runs a slot again (full or scaled)
    else:
        pytest.fail("38 slots skipped in a row: the forecast never moved")
    assert slot < 20


# ------------------------------------------------------------------ 11-14. the CLI


def _cli():
    import importlib

    return importlib.import_module("app.cli.main")


def test_cleanup_waits_longer_than_the_server_does(monkeypatch):
    cli = _cli()
    monkeypatch.delenv("VORTEX_CLEANUP_WAIT_S", raising=False)
    assert cli._default_timeout("cleanup") > 10  # the server's default wait before its 202
    monkeypatch.setenv("VORTEX_CLEANUP_WAIT_S", "40")
    assert cli._default_timeout("cleanup") > 40


@pytest.mark.parametrize("command, path, body", [
    ("cleanup", "/vram/cleanup", {"freed_bytes": 0, "duration_s": None}),
    ("status", "/vram/snapshot", {"usage_bytes": float("nan")}),
    ("status", "/vram/snapshot", {"usage_bytes": "12"}),
    ("models", "/vram/models", {"models": ["flux"]}),
    ("models", "/vram/models", {"total_bytes": "0"}),
])
def test_odd_answers_give_a_dash_or_one_line(monkeypatch, capsys, command, path, body):
    from tests.unit.test_cli_fuzz import CLEANUP, MODELS, SNAPSHOT, FakeClient

    cli = _cli()
    bodies = {"/vram/snapshot": SNAPSHOT, "/vram/models": MODELS, "/vram/cleanup": CLEANUP}
    bodies[path] = {**bodies[path], **body}
    monkeypatch.setattr(cli, "ControlPlaneClient", lambda *a, **k: FakeClient(bodies))
    monkeypatch.setenv("VORTEX_TOKEN", "t0ken")
    code = cli.main([command])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 0 or (code == 1 and len(err.strip().splitlines()) == 1)


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:port", "ftp://x"])
def test_a_malformed_url_is_one_line_and_exit_2(capsys, url):
    assert _cli().main(["status", "--url", url]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad URL" in err


@pytest.mark.parametrize("text", ["two\nlines", "ünïcode", "with space"])
def test_a_token_no_header_can_carry_is_one_line_and_exit_2(tmp_path, capsys, text):
    path = tmp_path / "token"
    path.write_text(text, encoding="utf-8")
    assert _cli().main(["cleanup", "--token-file", str(path), "--url",
                        "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "printable ASCII" in err


def test_top_fetches_the_histograms_only_when_a_slot_ended():
    from app.cli import histograms
    from app.cli.tracker import Tracker

    t = Tracker()
    t.add_snapshot({"generation_count": 5, "timestamp": "2026-12-01T12:00:00.000Z"})
    assert t.needs_histograms()
    four = histograms.parse(
        "# TYPE icn_vortex_vram_generation_peak_bytes histogram\n"
        "icn_vortex_vram_generation_peak_bytes_bucket{le=\"+Inf\"} 4\n"
        "icn_vortex_vram_generation_peak_bytes_count 4\n"
        "icn_vortex_vram_generation_peak_bytes_sum 4e9\n")
    assert four is not None and four.count == 4
    t.add_histogram(four)  # 5 generations, 4 measured: one could not be read
    t.add_snapshot({"generation_count": 5, "timestamp": "2026-12-01T12:00:01.000Z"})
    assert not t.needs_histograms()  # nothing new ended: no /metrics this refresh
    t.add_snapshot({"generation_count": 6, "timestamp": "2026-12-01T12:00:02.000Z"})
    assert t.needs_histograms()


# ------------------------------------------------- issue 19 (14, 15): the guards, model names


def test_a_guard_before_install_monitor_says_so_and_so_does_the_replacement(caplog):
    import app
    from app.guards import get_monitor

    with caplog.at_level("WARNING", logger="app.guards"):
        lazy = get_monitor()  # VORTEX_BACKEND unset: auto, the simulated card here
        assert "install_monitor" in caplog.text
        caplog.clear()
        app.install_monitor(VRAMMonitor(backend=SimulatedBackend(12 * GB)))
        assert "replaces the monitor" in caplog.text
    assert get_monitor() is not lazy


@pytest.mark.parametrize("name", ["", "   ", "two\nlines", "tab\there", "x" * 129, None, 7])
def test_odd_model_names_are_refused(monitor, card, name):
    with pytest.raises(ValueError, match="model name"), monitor.track_model_load(name):
        card.allocate(MB)
    with pytest.raises(ValueError, match="model name"):
        monitor.register_model(name, __import__("torch").nn.Linear(2, 2))
    assert monitor.models() == []


# ------------------------------------------------------ issue 19 (16): help before imports


def test_the_demo_parses_its_arguments_before_loading_torch_or_the_web_stack():
    import subprocess
    import sys

    code = ("import sys; from app.demo.cli import parse_args; parse_args(['--simulate']); "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
    bad = subprocess.run([sys.executable, "-m", "app", "--pressure-every", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--pressure-every" in bad.stderr


# ------------------------------------------------- issue 19 (5): config files not UTF-8


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, monkeypatch):
    from app.config import SettingsError, load_settings

    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_bytes(b"vram_limits:\n  soft_gb: 10\n  # \xff\xfe\n")
    monkeypatch.setenv("VORTEX_CONFIG_FILE", str(yaml_file))
    with pytest.raises(SettingsError, match=r"config\.yaml: not UTF-8") as err:
        load_settings()
    assert "\n" not in str(err.value)
    monkeypatch.delenv("VORTEX_CONFIG_FILE")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.env").write_bytes(b"VORTEX_SOFT_LIMIT_GB=10\n# \xff\n")
    with pytest.raises(SettingsError, match=r"settings\.env: not UTF-8"):
        load_settings()


# --------------------------------------------- issue 19 (1): a Director producing nothing


def test_a_run_of_lost_slots_makes_the_director_not_ready_until_one_is_produced(card, caplog):
    monitor = VRAMMonitor(backend=card, not_producing_after=20, python_warnings=False)
    with monitor.track_model_load("flux"):
        card.allocate(GB)
    monitor.preflight(required_gb=1.0)
    assert monitor.readiness().ready
    with caplog.at_level("WARNING", logger="app.monitor.monitor"):
        for slot in range(19):
            monitor.skip_slot(slot, "forecast does not fit")
        assert monitor.readiness().ready  # 19 lost: not yet
        with pytest.raises(MemoryPressureError), monitor.generation(19):
            raise MemoryPressureError("refused")  # an aborted slot counts as lost too
    state = monitor.readiness()
    assert (state.ready, state.reason) == (False, "not_producing")
    assert "20 slots" in state.detail
    assert monitor.snapshot().lost_slots_in_a_row == 20
    skipped_lines = [r for r in caplog.records if "skipped before it started" in r.message]
    assert len(skipped_lines) == 1  # 19 skips, one line: the rest summed up a minute later
    with monitor.generation(20):
        pass
    assert monitor.readiness().ready and monitor.liveness().lost_in_a_row == 0
    assert monitor.readiness(shutting_down=True).reason == "shutting_down"


# ----------------------------------- issue 19 (4): a cleanup that freed nothing blocks no one


def test_a_soft_limit_cleanup_that_freed_nothing_does_not_hold_the_operators_clock(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=3600, python_warnings=False)
    monitor._cleanups.run("soft_limit")  # nothing cached: frees 0 B
    result = monitor.request_cleanup("http")  # not a 429
    assert result is not None and result.reason == "http"
    from app.errors import CleanupCooldownError

    with pytest.raises(CleanupCooldownError):  # the operator's own cleanup keeps the clock
        monitor.request_cleanup("http")
