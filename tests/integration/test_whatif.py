"""``vortex-vram whatif`` on a real dump: the snapshot a running control plane served over
loopback, saved by ``vortex-vram dump``, loaded into a twin; its answers are what the card
it was taken of does."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from app.backends.capture import AllocationTrace
from app.cli.main import main
from tests.integration.conftest import TOKEN

MB = 10**6


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: a bad argument
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _churn(card, rng: random.Random) -> list[int]:
    """A Director's leftovers between slots: allocations of 512 B to 600 MB made and freed
    at random, some kept: cached segments, split blocks, a few pinned."""
    live: list[int] = []
    for _ in range(300):
        if live and rng.random() < 0.5:
            card.free(live.pop(rng.randrange(len(live))))
        else:
            with contextlib.suppress(torch.OutOfMemoryError):
                live.append(card.allocate(int(2 ** rng.uniform(9, 29.2))))
    return live


@pytest.fixture
def dumped(cli, plane, node, tmp_path: Path):
    """(card, path of the dump): the card churned, then dumped through the CLI."""
    _, card = node
    card.record_memory_history(True)
    _churn(card, random.Random(5))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    path = tmp_path / "director.pickle"
    code, _, err = cli("dump", "-o", str(path), "--url", plane.url, "--token-file", str(token))
    assert (code, err) == (0, "")
    return card, path


def _allocates(card, nbytes: int) -> bool:
    copy = card.clone()
    try:
        copy.allocate(nbytes)
    except torch.OutOfMemoryError:
        return False
    return True


def test_a_request_fits_on_the_dump_exactly_when_it_fits_on_the_card(cli, dumped):
    card, path = dumped
    s = card.sample()
    state = card.cache_state(0)
    free_somewhere = state.room_bytes + s.reserved_bytes - s.allocated_bytes
    answers = {}
    for mb in range(50, 2500, 50):
        code, out, err = cli("whatif", str(path), "--request", f"{mb}MB")
        assert err == "" and code in (0, 7), (mb, err)
        assert (code == 0) == _allocates(card, mb * MB), mb
        answers[mb] = code
        if code == 7:
            assert "does not fit: the allocator would run out of memory" in out
            assert "a new segment needs" in out and "pinned " in out
    assert set(answers.values()) == {0, 7}
    # The point of it: a request below what is free in all, which the cache's shape refuses.
    assert any(code == 7 and mb * MB < free_somewhere for mb, code in answers.items())


def test_a_trace_and_a_hard_limit_are_rehearsed_as_the_card_would_run_them(
        cli, dumped, tmp_path: Path):
    card, path = dumped
    events = []
    for i in range(6):  # six 150 MB activations, each freed two steps later
        events.append(150 * MB)
        if i >= 2:
            events.append(~(i - 2))
    trace = AllocationTrace(tuple(events))
    trace_file = tmp_path / "forward.json"
    trace_file.write_text(json.dumps(trace.to_dict()))
    usage = card.sample().allocated_bytes
    for limit in (usage + 300 * MB, usage + 600 * MB):
        code, out, err = cli("whatif", str(path), "--trace", str(trace_file), "--repeats",
                             "3", "--hard-limit", str(limit))
        r = card.rehearse([(trace, 3)], hard_limit_bytes=limit)
        assert err == ""
        assert code == (0 if r.fits else 7)
        assert ("fits" in out.splitlines()[1]) == r.fits
    assert card.rehearse([(trace, 3)], hard_limit_bytes=usage + 300 * MB).fits is False
    assert card.rehearse([(trace, 3)], hard_limit_bytes=usage + 600 * MB).fits is True


def test_the_json_of_the_snapshot_works_as_the_pickle(cli, dumped, tmp_path: Path):
    _, path = dumped
    as_json = tmp_path / "director.json"
    snap = pickle.loads(path.read_bytes())  # our own test's file: safe to unpickle here
    as_json.write_text(json.dumps(snap, default=list))
    for request in ("100MB", "2GB"):
        a = cli("whatif", str(path), "--request", request)
        b = cli("whatif", str(as_json), "--request", request)
        assert a[0] == b[0] and a[1].splitlines()[1:] == b[1].splitlines()[1:]


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_hostile_pickle_runs_nothing_and_bad_files_are_one_line(cli, tmp_path: Path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"segments": [_Boom()]}))
    code, out, err = cli("whatif", str(evil), "--request", "1GB")
    assert (code, out) == (2, "")
    assert "posix.system" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
    bad_trace = tmp_path / "t.json"
    bad_trace.write_text(json.dumps({**AllocationTrace((5,)).to_dict(), "events": [5, ~3]}))
    not_a_snapshot = tmp_path / "n.json"
    not_a_snapshot.write_text('{"hello": 1}')
    for args, words in [
        ((str(tmp_path / "missing.pickle"), "--request", "1GB"), "cannot read"),
        ((str(not_a_snapshot), "--request", "1GB"), "not a memory snapshot"),
        ((str(evil), "--request", "a lot"), "not a size"),
        ((str(not_a_snapshot), "--trace", str(bad_trace)), "not a memory snapshot"),
    ]:
        code, out, err = cli("whatif", *args)
        assert code == 2 and out == "", args
        assert "Traceback" not in err and words in err, (args, err)


def test_a_trace_file_that_lies_is_refused_naming_the_event(cli, dumped, tmp_path: Path):
    _, path = dumped
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({**AllocationTrace((5,)).to_dict(), "events": [5, ~0, ~0]}))
    code, out, err = cli("whatif", str(path), "--trace", str(bad))
    assert (code, out) == (2, "")
    assert "events[2] frees allocation 0, which is freed already" in err
