from __future__ import annotations

import pytest

from app import SimulatedBackend, VRAMMonitor, start_control_plane
from tests.conftest import load_card_models

TOKEN = "t0ps3cret-token"


@pytest.fixture
def node():
    """A monitor on a simulated card with the five models loaded, pre-flight passed."""
    card = SimulatedBackend(12 * 2**30, context_bytes=350_000_000)
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=30.0)
    monitor.preflight()
    load_card_models(monitor, card)
    return monitor, card


@pytest.fixture
def plane(node):
    monitor, _ = node
    cp = start_control_plane(monitor, port=0, token=TOKEN)
    yield cp
    cp.stop()
