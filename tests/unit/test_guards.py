"""The module-level guards act on the process-wide monitor."""

from __future__ import annotations

import pytest
import torch

import app
from app import MemoryPressureError, VortexInitializationError, VRAMMonitor
from tests.conftest import GB, MB, allocate_exact, load_card_models


def test_guards_use_the_installed_monitor(card):
    monitor = VRAMMonitor(backend=card)
    app.install_monitor(monitor)
    assert app.get_monitor() is monitor
    load_card_models(monitor, card)
    assert app.get_current_vram_usage() == card.sample().allocated_bytes
    assert app.get_vram_breakdown()["flux"] == 6.0
    assert app.check_limits() == card.sample().allocated_bytes
    with pytest.raises(MemoryPressureError):
        app.check_allocation(GB)
    card.free(card.allocate(50 << 20))
    assert app.clear_cuda_cache() >= 50 << 20
    assert allocate_exact(card, MB)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_a_cuda_monitor_says_why(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VORTEX_BACKEND", "cuda")
    with pytest.raises(VortexInitializationError, match=r"CUDA is not available.*SimulatedBackend"):
        app.check_limits()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_without_cuda_auto_falls_back_to_the_simulated_card_loudly(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VORTEX_BACKEND", raising=False)
    assert app.check_limits() == 0
    assert app.get_monitor().device == "sim:0"
    assert any(r.levelname == "WARNING" and "SIMULATED" in r.getMessage() for r in caplog.records)


def test_the_public_names_import_on_first_use_and_match_all():
    import subprocess
    import sys

    assert sorted(app.__all__) == sorted([*app._EXPORTS, "__version__"])
    for name in app.__all__:
        assert getattr(app, name) is not None, name
    # The vortex-vram command imports app.cli without torch (3 s of start-up).
    code = "import sys, app.cli.main; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]
