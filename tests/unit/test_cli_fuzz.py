"""vortex-vram on arbitrary answers (hypothesis): whatever JSON comes back, the command prints
a view or one error line, and never a traceback.

The answers keep the control plane's field names, so the renderers meet every field, with any
JSON in it: null, strings, NaN (which Python's json reads), lists, nested objects. The example
count is bounded for CI (``VORTEX_CLI_FUZZ_EXAMPLES``, default 60).
"""

from __future__ import annotations

import importlib
import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from app import SimulatedBackend, VRAMMonitor
from app.cli.client import Answer
from app.cli.errors import ExitCode
from app.cli.live import Feed, top_view

EXAMPLES = int(os.environ.get("VORTEX_CLI_FUZZ_EXAMPLES", "60"))
cli = importlib.import_module("app.cli.main")  # the module: app.cli.main is also the function
# The shapes the control plane really sends, to take field names from.
_card = SimulatedBackend(12 * 10**9)
_monitor = VRAMMonitor(backend=_card)
with _monitor.track_model_load("flux"):
    _card.allocate(10**9)
SNAPSHOT = _monitor.snapshot().to_dict()
MODELS = {"device": "sim:0", "total_bytes": 10**9, "over_budget": [],
          "models": [{"name": "flux", "vram_bytes": 10**9, "budget_bytes": None,
                      "over_budget": False, "source": "allocator_delta"}]}
CLEANUP = {"reason": "http", "freed_bytes": 0, "reserved_before_bytes": 0,
           "reserved_after_bytes": 0, "allocated_bytes": 0, "duration_s": 0.01,
           "timestamp": "2026-12-01T12:00:00.000Z"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def mutated(shape: dict) -> st.SearchStrategy:
    """The real answer with some fields replaced by anything, some dropped."""
    keys = sorted(shape)
    return st.builds(
        lambda changes, dropped: {k: changes.get(k, v) for k, v in shape.items()
                                  if k not in dropped},
        st.dictionaries(st.sampled_from(keys), anything, max_size=6),
        st.sets(st.sampled_from(keys), max_size=3))


answers = st.one_of(anything, mutated(SNAPSHOT), mutated(MODELS), mutated(CLEANUP))


class FakeClient:
    """Answers every path with the JSON drawn for it."""

    def __init__(self, bodies: dict[str, object], status: int = 200) -> None:
        self.bodies, self.status = bodies, status
        self.url = "http://127.0.0.1:8000"
        self.has_token = True

    def _answer(self, path: str) -> Answer:
        body = self.bodies.get(path.split("?")[0], {})
        return Answer(self.status, {"content-type": "application/json"},
                      json.dumps(body).encode())

    def get(self, path: str, *, accept: str = "application/json") -> Answer:
        return self._answer(path)

    def post(self, path: str) -> Answer:
        return self._answer(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("command", ["status", "models", "cleanup", "frag"])
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(snapshot=answers, models=answers, cleanup=answers, status=st.sampled_from([200, 202]))
def test_no_answer_gives_a_traceback(monkeypatch, capsys, command, snapshot, models, cleanup,
                                     status):
    bodies = {"/vram/snapshot": snapshot, "/vram/models": models, "/vram/cleanup": cleanup,
              "/vram/memory_snapshot": snapshot}
    monkeypatch.setattr(cli, "ControlPlaneClient",
                        lambda url, token=None, timeout=5.0: FakeClient(bodies, status))
    monkeypatch.setenv("VORTEX_TOKEN", "t0ken")
    code = cli.main([command])  # raises nothing: a view, or one error line
    out, err = capsys.readouterr()
    assert code in list(ExitCode)
    assert "Traceback" not in out + err
    if code != ExitCode.OK:
        assert len(err.strip().splitlines()) == 1, err


@settings(max_examples=EXAMPLES, deadline=None)
@given(snapshots=st.lists(answers, min_size=1, max_size=3), models=answers)
def test_top_renders_any_answer_or_fails_as_main_reports(snapshots, models):
    """top's view over a few refreshes of arbitrary answers: drawn, or an error that
    ``main`` turns into its one line (the live view restores the terminal on the way)."""
    console = Console(file=io.StringIO(), width=120, height=40)
    client = FakeClient({"/vram/models": models, "/metrics": ""})
    feed = Feed(client)
    try:
        for snap in snapshots:
            client.bodies["/vram/snapshot"] = snap
            feed.refresh(keep_going=True)
            console.print(top_view(feed, console, 1.0, keys=True))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError):
        pass  # what main() reports as "the answer is not what the control plane sends"


def _memory_snapshot() -> dict:
    card = SimulatedBackend(2 * 10**9, context_bytes=10**8)
    kept = [card.allocate(n) for n in (300 * 10**6, 5 << 20, 4096, 60 * 10**6)]
    card.free(kept[3])  # a cached segment
    card.free(card.allocate(3 << 20))
    return json.loads(json.dumps(card.memory_snapshot(), default=list))


MEMORY_SNAPSHOT = _memory_snapshot()
_SEGMENT = MEMORY_SNAPSHOT["segments"][0]
_BLOCK = _SEGMENT["blocks"][0]
dumps = st.one_of(
    anything, mutated(MEMORY_SNAPSHOT),
    st.builds(lambda seg: {**MEMORY_SNAPSHOT, "segments": [seg, *MEMORY_SNAPSHOT["segments"]]},
              mutated(_SEGMENT)),
    st.builds(lambda block: {**MEMORY_SNAPSHOT, "segments": [
        {**_SEGMENT, "blocks": [block, *_SEGMENT["blocks"][1:]]},
        *MEMORY_SNAPSHOT["segments"][1:]]}, mutated(_BLOCK)))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dump=dumps, request=st.sampled_from(["1MB", "100MB", "1.5GB"]))
def test_whatif_on_any_dump_answers_or_says_why_in_one_line(tmp_path, capsys, dump, request):
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(dump))
    code = cli.main(["whatif", str(path), "--request", request])
    out, err = capsys.readouterr()
    assert code in list(ExitCode)
    assert "Traceback" not in out + err
    if code not in (ExitCode.OK, ExitCode.DOES_NOT_FIT):
        assert len(err.strip().splitlines()) == 1, err


def test_whatif_on_the_unmutated_dump_answers():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(MEMORY_SNAPSHOT, f)
        f.flush()
        assert cli.main(["whatif", f.name, "--request", "100MB"]) == ExitCode.OK
        assert cli.main(["whatif", f.name, "--request", "1.9GB"]) == ExitCode.DOES_NOT_FIT
