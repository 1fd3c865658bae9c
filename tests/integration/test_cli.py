"""``vortex-vram`` against a real control plane on loopback, and ``top`` in a real terminal."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app import SimulatedBackend, VRAMMonitor, start_control_plane
from app.api.server import serve_in_thread
from app.cli.main import main
from app.cli.units import size
from tests.conftest import CARD_MODELS, allocate_exact, load_card_models
from tests.integration.conftest import TOKEN
from tests.integration.helpers import running_demo

CONSOLE_SCRIPT = Path(sys.executable).with_name("vortex-vram")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VORTEX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "100")  # rich's width when the output is not a terminal


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """``vortex-vram ARGS`` in this process: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vortex-vram: error: ")
    return lines[0]


# -- status, models ---------------------------------------------------------------------


def test_status_shows_the_card_at_a_glance(cli: Run, plane, node) -> None:
    _, card = node
    snap = httpx.get(f"{plane.url}/vram/snapshot").json()
    code, out, err = cli("status", "--url", plane.url)
    assert (code, err) == (0, "")
    assert snap["device_uuid"] and snap["device_uuid"] in out
    assert "sim:0" in out and card.name in out
    assert f"usage {snap['usage_bytes'] / 1e9:.3f} GB" in out
    assert "soft 11.0" in out and "hard 11.5" in out  # the limits as the settings write them
    bar = next(line for line in out.splitlines() if "[" in line and "┃" in line)
    assert bar.count("┃") == 2  # the limits marked on the usage bar
    for name, size_gb in CARD_MODELS.items():
        row = next(line for line in out.splitlines() if line.strip("│ ").startswith(name))
        assert f"{size_gb:.3f}" in row, row  # resident and budget
    assert "slots 0: completed 0 (full 0, degraded 0)" in out and "soft excursions 0" in out
    assert "last cleanup  none since start" in out
    assert "idle; last generation none yet; not stalled" in out
    assert "forecast" not in out  # no slot yet, so no forecast


def test_status_follows_generations_cleanups_and_the_forecast(cli: Run, plane, node) -> None:
    monitor, card = node
    for slot in (1, 2, 3):
        with monitor.generation(slot):
            card.free(card.allocate(400 << 20))
    monitor.emergency_cleanup()
    code, out, _ = cli("status", "--url", plane.url)
    assert code == 0
    assert "slots 3: completed 3 (full 3, degraded 0)" in out
    assert "missed" not in out and "failed 0" not in out  # nothing missed, one name each
    assert re.search(r"last cleanup  manual at \d\d:\d\d:\d\dZ: freed 0\.\d{3} GB", out), out
    assert re.search(r"last generation ended \d+\.\ds ago", out)
    forecast = next(line for line in out.splitlines() if "forecast" in line)
    snap = httpx.get(f"{plane.url}/vram/snapshot").json()
    assert f"peak {snap['forecast_peak_bytes'] / 1e9:.3f} GB" in forecast
    assert f"headroom {snap['forecast_headroom_bytes'] / 1e9:+.3f} GB" in forecast
    assert "under hard 11.5 (from 3 slots)" in forecast


def test_status_json_is_the_snapshot(cli: Run, plane) -> None:
    code, out, _ = cli("status", "--json", "--url", plane.url)
    assert code == 0
    body = json.loads(out)
    again = httpx.get(f"{plane.url}/vram/snapshot").json()
    assert set(body) == set(again)
    assert body["usage_bytes"] == again["usage_bytes"] and body["event"] == "http_snapshot"


def test_models_table_and_json(cli: Run, plane, node) -> None:
    monitor, card = node
    with monitor.track_model_load("upscaler", budget_gb=0.1):
        allocate_exact(card, 150_000_000)
    code, out, _ = cli("models", "--url", plane.url)
    assert code == 0
    assert "sim:0: 6 models" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(CARD_MODELS) | {"upscaler", "total"} == set(rows)
    assert rows["flux"].split()[1:4] == ["6.000", "6.000", "100.0%"]
    assert rows["upscaler"].split()[1:] == ["0.150", "0.100", "150.0%", "OVER"]
    code, out, _ = cli("models", "--json", "--url", plane.url)
    assert code == 0
    assert json.loads(out) == httpx.get(f"{plane.url}/vram/models").json()


# -- cleanup ----------------------------------------------------------------------------


def test_cleanup_prints_what_it_freed_then_cools_down(cli: Run, plane, node,
                                                      token_file: Path) -> None:
    monitor, card = node
    card.free(card.allocate(300 << 20))  # cached: what a cleanup gives back
    code, out, err = cli("cleanup", "--url", plane.url, "--token-file", str(token_file))
    assert (code, err) == (0, "")
    assert out.startswith(f"cleanup freed {(300 << 20) / 1e9:.3f} GB: reserved ")
    assert monitor.emergency_cleanups == 1
    code, out, err = cli("cleanup", "--url", plane.url, "--token-file", str(token_file))
    assert (code, out) == (5, "")
    line = one_error_line(err)
    assert re.search(r"cooling down \(429\), retry after (29|30)s: emergency cleanup is "
                     r"cooling down; retry in \d+\.\ds \(last cleanup: http at ", line), line
    assert monitor.emergency_cleanups == 1


def test_cleanup_token_sources_in_order(cli: Run, plane, token_file: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    monkeypatch.setenv("VORTEX_TOKEN", "not-the-token")
    monkeypatch.setenv("VORTEX_TOKEN_FILE", str(wrong))
    # --token-file beats both variables
    code, out, _ = cli("cleanup", "--json", "--url", plane.url, "--token-file", str(token_file))
    assert code == 0 and json.loads(out)["reason"] == "http"
    # VORTEX_TOKEN_FILE beats VORTEX_TOKEN: the wrong file is what was sent
    code, _, err = cli("cleanup", "--url", plane.url)
    assert code == 4 and "the token was refused" in one_error_line(err)
    monkeypatch.setenv("VORTEX_TOKEN_FILE", str(token_file))
    code, _, err = cli("cleanup", "--url", plane.url)
    assert code == 5  # accepted, and within the cooldown of the first


def test_cleanup_without_or_with_a_bad_token_is_unauthorized(cli: Run, plane, node,
                                                             tmp_path: Path) -> None:
    monitor, _ = node
    code, out, err = cli("cleanup", "--url", plane.url)
    assert (code, out) == (4, "")
    line = one_error_line(err)
    assert "unauthorized (401): missing or invalid bearer token" in line
    assert "no token given: use --token-file, VORTEX_TOKEN_FILE or VORTEX_TOKEN" in line
    bad = tmp_path / "bad"
    bad.write_text("wrong-token")
    code, _, err = cli("cleanup", "--url", plane.url, "--token-file", str(bad))
    assert code == 4 and "the token was refused" in one_error_line(err)
    assert monitor.emergency_cleanups == 0


def test_cleanup_needs_no_token_where_none_is_set(cli: Run, node) -> None:
    monitor, _ = node
    with start_control_plane(monitor, port=0) as open_plane:
        code, out, _ = cli("cleanup", "--json", "--url", open_plane.url)
    assert code == 0
    assert set(json.loads(out)) >= {"reason", "freed_bytes", "reserved_before_bytes",
                                    "reserved_after_bytes", "allocated_bytes", "duration_s"}


def test_cleanup_during_a_generation_is_scheduled(cli: Run) -> None:
    card = SimulatedBackend(12 * 2**30, context_bytes=350_000_000)
    monitor = VRAMMonitor(backend=card, cleanup_wait_s=0.2)
    load_card_models(monitor, card)
    with start_control_plane(monitor, port=0) as open_plane:
        with monitor.generation(1):  # this thread reaches no boundary while the CLI waits
            code, out, err = cli("cleanup", "--url", open_plane.url)
            assert monitor.emergency_cleanups == 0
        assert monitor.emergency_cleanups == 1  # run at the slot's end
    assert (code, err) == (0, "")
    assert out.startswith("cleanup scheduled: a generation is running")


# -- dump, frag -------------------------------------------------------------------------


def _pin(card: SimulatedBackend) -> int:
    """A 20 MiB segment held by one 5 MiB block, allocated here (the frame frag names)."""
    handles = []
    for _ in range(4):  # a loop, not a comprehension: the frame is this function's
        handles.append(card.allocate(5 << 20))
    for h in handles[1:]:
        card.free(h)
    return handles[0]


def test_dump_saves_the_pickle_as_it_came_and_says_how_to_open_it(
        cli: Run, plane, node, token_file: Path, tmp_path: Path) -> None:
    _, card = node
    card.record_memory_history(True)
    _pin(card)
    target = tmp_path / "vram dump.pickle"  # a space: the printed command must quote it
    code, out, err = cli("dump", "-o", str(target), "--url", plane.url,
                         "--token-file", str(token_file))
    assert (code, err) == (0, "")
    (line,) = out.splitlines()
    assert line == (f"saved the allocator snapshot ({size(target.stat().st_size)}) to {target}; "
                    f"open it with `python -m torch.cuda._memory_viz segment_plot "
                    f"{shlex.quote(str(target))} -o segments.html` or at "
                    "https://pytorch.org/memory_viz")
    assert pickle.loads(target.read_bytes())["segments"] == card.memory_snapshot()["segments"]
    # What it says to run runs.
    argv = shlex.split(re.search(r"`([^`]+)`", line).group(1))
    done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "<script" in (tmp_path / "segments.html").read_text()
    # Within 5 s: cooling down, and nothing written.
    again = tmp_path / "again.pickle"
    code, out, err = cli("dump", "-o", str(again), "--url", plane.url,
                         "--token-file", str(token_file))
    assert (code, out) == (5, "")
    assert re.search(r"GET /vram/memory_snapshot: cooling down \(429\), retry after [1-5]s: a "
                     r"memory snapshot is costly: one every 5s", one_error_line(err))
    assert not again.exists()


def test_dump_without_the_token_or_somewhere_unwritable(cli: Run, plane, token_file: Path,
                                                         tmp_path: Path) -> None:
    target = tmp_path / "x.pickle"
    code, out, err = cli("dump", "-o", str(target), "--url", plane.url)
    assert (code, out) == (4, "") and "no token given" in one_error_line(err)
    assert not target.exists()
    code, out, err = cli("dump", "-o", str(tmp_path / "no" / "such" / "dir.pickle"),
                         "--url", plane.url, "--token-file", str(token_file))
    assert (code, out) == (2, "")
    assert "cannot write " in one_error_line(err)


def test_frag_names_the_pinned_segments_and_who_holds_them(cli: Run, plane, node,
                                                          token_file: Path) -> None:
    _, card = node
    card.record_memory_history(True)
    _pin(card)
    code, out, err = cli("frag", "--url", plane.url, "--token-file", str(token_file))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    held = next(i for i, x in enumerate(lines) if "in _pin" in x)
    assert re.fullmatch(r"segment 0x[0-9a-f]+  large  size 20\.972 MB  free 15\.729 MB "
                        r"\(75\.0 %\)  held by 1 live block:", lines[held - 1]), lines[held - 1]
    assert re.fullmatch(r" +5\.243 MB  at 0x[0-9a-f]+  integration/test_cli\.py:\d+ in _pin",
                        lines[held])
    assert re.fullmatch(r"pinned \d+ segments? in \d+ segments \(at least 50 % free, at most 4 "
                        r"live blocks\), stranding \d\.\d{3} GB", lines[-2]), lines[-2]
    assert lines[-1].startswith("frag ") and lines[-1].endswith("expandable off")
    assert all(len(x) <= 100 or x.startswith("pinned ") for x in lines)


def test_frag_json_backend_failure_and_an_answer_without_segments(
        cli: Run, node, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, card = node
    with start_control_plane(monitor, port=0) as open_plane:
        code, out, _ = cli("frag", "--json", "--url", open_plane.url)
        assert code == 0
        assert json.loads(out)["segments"] == json.loads(json.dumps(
            card.memory_snapshot()["segments"]))
    monkeypatch.setattr(card, "memory_snapshot", lambda: 1 / 0)
    with start_control_plane(monitor, port=0) as open_plane:
        code, out, err = cli("frag", "--url", open_plane.url)
    assert (code, out) == (6, "")
    assert one_error_line(err) == (
        "vortex-vram: error: GET /vram/memory_snapshot: VRAM backend unavailable: reading the "
        "device failed (ZeroDivisionError) (503)")

    async def not_a_snapshot(scope, receive, send) -> None:  # a proxy, another service
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"segments": 3}'})

    other = serve_in_thread(not_a_snapshot)
    try:
        code, out, err = cli("frag", "--url", other.url)
        assert (code, out) == (1, "")
        assert one_error_line(err) == ("vortex-vram: error: GET /vram/memory_snapshot: not an "
                                       "allocator snapshot: it has no list of segments")
        code, out, err = cli("dump", "-o", "/dev/null", "--url", other.url)
        assert (code, out) == (1, "")
        assert "the answer is no pickle (application/json)" in one_error_line(err)
    finally:
        other.stop()


# -- errors -----------------------------------------------------------------------------


def test_backend_unavailable_is_exit_6(cli: Run, plane, node, token_file: Path) -> None:
    _, card = node
    card.set_faults(reads=True)
    for command in ("status", "status --json"):
        code, out, err = cli(*command.split(), "--url", plane.url)
        assert (code, out) == (6, "")
        assert one_error_line(err) == (
            "vortex-vram: error: GET /vram/snapshot: VRAM backend unavailable: reading the "
            "device failed (RuntimeError) (503)")
    card.set_faults(empty_cache=True)
    code, _, err = cli("cleanup", "--url", plane.url, "--token-file", str(token_file))
    assert code == 6
    assert "POST /vram/cleanup: VRAM backend unavailable" in one_error_line(err)


@pytest.mark.parametrize("command", ["status", "models", "cleanup", "dump -o x", "frag"])
def test_unreachable_is_exit_3(cli: Run, command: str) -> None:
    port = closed_port()
    code, out, err = cli(*command.split(), "--url", f"http://127.0.0.1:{port}")
    assert (code, out) == (3, "")
    assert one_error_line(err) == (
        f"vortex-vram: error: cannot reach the control plane at http://127.0.0.1:{port}: "
        "connection refused (is the Director running, on this port?)")


def test_a_server_that_never_answers_is_exit_3(cli: Run) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        code, _, err = cli("status", "--url", url, "--timeout", "0.3")
    assert code == 3 and time.monotonic() - t0 < 5
    assert one_error_line(err).endswith("no answer within 0.3s")


def test_other_http_errors_are_exit_1(cli: Run, plane) -> None:
    code, _, err = cli("status", "--url", f"{plane.url}/no/such/prefix")
    assert code == 1
    assert one_error_line(err) == ("vortex-vram: error: GET /vram/snapshot: HTTP 404: "
                                   "Not Found")


@pytest.mark.parametrize("args", [["bogus"], [], ["top", "--interval", "0"],
                                  ["status", "--url", "ftp://x"], ["dump"],
                                  ["cleanup", "--token-file", "/nonexistent/token"]])
def test_usage_errors_are_exit_2(cli: Run, args: list[str]) -> None:
    try:
        code = cli(*args)[0]
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2


def test_url_defaults_to_vortex_host_and_port(cli: Run, plane,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VORTEX_HOST", "0.0.0.0")  # a Director listening on all: loopback
    monkeypatch.setenv("VORTEX_PORT", str(plane.port))
    code, out, _ = cli("models", "--json")
    assert code == 0 and json.loads(out)["device"] == "sim:0"


def test_the_console_script_exits_with_its_codes(plane) -> None:
    assert CONSOLE_SCRIPT.exists(), "pip install -e . installs the vortex-vram script"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VORTEX_")}
    done = subprocess.run([str(CONSOLE_SCRIPT), "status", "--url", plane.url],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and "soft 11.0" in done.stdout
    assert "\x1b[" not in done.stdout  # no colours into a pipe
    done = subprocess.run([str(CONSOLE_SCRIPT), "cleanup", "--url", plane.url],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 4 and one_error_line(done.stderr)
    done = subprocess.run([str(CONSOLE_SCRIPT), "top", "--url", plane.url],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2  # stdout is a pipe: no screen to draw on
    assert "top needs a terminal" in one_error_line(done.stderr)
    done = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0
    assert "6  VRAM backend unavailable (503)" in done.stdout  # the exit codes, documented


# -- top in a real terminal --------------------------------------------------------------


class Tmux:
    """A tmux server of its own (``-L``), so nothing touches the user's sessions."""

    def __init__(self) -> None:
        self.socket = f"vortex-cli-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "cli")

    def wait_for(self, predicate: Callable[[str], bool], what: str,
                 timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not show within {timeout}s:\n{screen}")
            time.sleep(0.1)  # polling the pane, not waiting for a race to settle


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux absent: apt-get install -y tmux")
    t = Tmux()
    shell = "env PS1='cli$ ' TERM=xterm-256color bash --norc --noprofile"
    t("new-session", "-d", "-s", "cli", "-x", "140", "-y", "45", "-c", str(tmp_path), shell)
    try:
        yield t
    finally:
        subprocess.run(["tmux", "-L", t.socket, "kill-server"], capture_output=True, timeout=10)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.append(int(stat.parent.name))
    return found


def _generation_count(screen: str) -> int | None:
    m = re.search(r"slots (\d+): completed", screen)
    return int(m.group(1)) if m else None


def _cli() -> str:
    """The command as an operator types it: the console script, where it is installed."""
    if CONSOLE_SCRIPT.exists():
        return shlex.quote(str(CONSOLE_SCRIPT))
    return f"{shlex.quote(sys.executable)} -m app.cli"


def _run_top_and_quit(tmux: Tmux, url: str, quit_with: Callable[[], None],
                      exit_code: int = 0) -> None:
    tmux("send-keys", "-t", "cli", "clear", "Enter")
    tmux("send-keys", "-t", "cli", f"{_cli()} top --url {url}; echo top-exited-$?", "Enter")
    first = tmux.wait_for(
        lambda s: all(m in s for m in CARD_MODELS) and "usage 10." in s and "soft 11.0" in s
        and _generation_count(s) is not None, "top with the models and the usage")
    assert "hard 11.5" in first and "recent generations" in first and "events" in first
    assert tmux("display", "-p", "-t", "cli", "#{alternate_on}").strip() == "1"
    seen = _generation_count(first)
    tmux.wait_for(lambda s: (_generation_count(s) or 0) > seen, "a refresh")
    quit_with()
    after = tmux.wait_for(lambda s: "top-exited-" in s.replace("top-exited-$?", ""),
                          "the shell after top")
    assert f"top-exited-{exit_code}" in after, after
    # The alternate screen is gone, and nothing of top is left on the shell's screen.
    assert tmux("display", "-p", "-t", "cli", "#{alternate_on} #{cursor_flag}").split() == [
        "0", "1"]
    assert not any(m in after for m in ("flux", "╭", "█", "completed")), after
    assert after.rstrip().endswith("cli$"), after
    # The terminal is back in canonical mode with echo: cbreak did not outlive top.
    tmux("send-keys", "-t", "cli",
         "echo modes-$(stty -a | tr ' ;' '\\n\\n' | grep -c -x -e -icanon -e -echo)", "Enter")
    screen = tmux.wait_for(lambda s: re.search(r"modes-\d", s) is not None, "the modes",
                           timeout=10)
    assert re.search(r"modes-(\d)", screen).group(1) == "0", screen


def test_top_in_a_terminal_refreshes_and_quits_cleanly(tmux: Tmux, tmp_path: Path) -> None:
    def keys(*keys: str) -> Callable[[], None]:
        return lambda: tmux("send-keys", "-t", "cli", *keys)

    def terminate() -> None:  # as `kill` or a closing session would stop it
        shell = int(tmux("display", "-p", "-t", "cli", "#{pane_pid}"))
        top = _children(shell)
        assert len(top) == 1, top
        os.kill(top[0], signal.SIGTERM)

    with running_demo(tmp_path, "--log-level", "WARNING") as (_proc, url):
        _run_top_and_quit(tmux, url, keys("q"))  # as a person quits it
        _run_top_and_quit(tmux, url, keys("C-c"))  # the other way people quit things
        _run_top_and_quit(tmux, url, terminate, exit_code=128 + signal.SIGTERM)


def test_top_with_no_director_says_so_in_one_line(tmux: Tmux) -> None:
    port = closed_port()
    tmux("send-keys", "-t", "cli", f"{_cli()} top --url http://127.0.0.1:{port}; "
         "echo top-exited-$?", "Enter")
    screen = tmux.wait_for(lambda s: "top-exited-" in s.replace("top-exited-$?", ""),
                           "the shell after top")
    assert "top-exited-3" in screen
    assert f"cannot reach the control plane at http://127.0.0.1:{port}" in screen
    assert "Traceback" not in screen and "╭" not in screen  # never drew a screen


# -- summary (issue 19) ------------------------------------------------------------------


def test_summary_prints_torchs_table_as_it_came(cli: Run, plane, node) -> None:
    monitor, card = node
    code, out, err = cli("summary", "--url", plane.url)
    assert (code, err) == (0, "")
    assert out == monitor.memory_summary()
    assert "PyTorch CUDA memory summary" in out and "| Allocated memory      |" in out
    card.set_faults(reads=True)
    code, _, err = cli("summary", "--url", plane.url)
    assert code == 6 and "VRAM backend unavailable" in one_error_line(err)


def test_summary_from_something_else_is_one_error_line(cli: Run) -> None:
    async def app(scope, receive, send):  # a proxy's error page where the summary goes
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": b"<html>\xff\xfe</html>"})

    other = serve_in_thread(app)
    try:
        code, out, err = cli("summary", "--url", other.url)
    finally:
        other.stop()
    assert code == 1 and out == ""
    assert "the answer is no memory summary (text/html)" in one_error_line(err)
