from __future__ import annotations

import pytest
import torch

from app import SimulatedBackend, VRAMMonitor, install_monitor

GB = 1_000_000_000
MB = 1_000_000
CARD_MODELS = {"flux": 6.0, "liveportrait": 3.5, "kokoro": 0.4, "clip_b": 0.3, "clip_l": 0.6}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run the tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        if torch.cuda.is_available():
            return
        reason = "--gpu given, but torch sees no CUDA device here"
    else:
        reason = "needs a CUDA GPU: run `pytest --gpu` on a GPU host"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_process_monitor():
    install_monitor(None)
    yield
    install_monitor(None)


@pytest.fixture
def card() -> SimulatedBackend:
    """A simulated RTX 3060 as the task card counts it: 12 GB."""
    return SimulatedBackend(12 * GB)


@pytest.fixture
def monitor(card: SimulatedBackend) -> VRAMMonitor:
    return VRAMMonitor(backend=card, cleanup_cooldown_s=0.0)


def allocate_exact(card: SimulatedBackend, nbytes: int) -> list[int]:
    """Allocate so that allocated bytes grow by ``nbytes`` to the 512 bytes, as tensors would:
    a 2 MiB-aligned large block (its own segment, unsplit), then sub-MiB small blocks."""
    handles, big = [], nbytes // (2 << 20) * (2 << 20)
    if big >= 10 << 20:
        handles.append(card.allocate(big))
        nbytes -= big
    while nbytes > 0:
        chunk = min(nbytes, 1 << 20)
        handles.append(card.allocate(chunk))
        nbytes -= chunk
    return handles


def load_card_models(monitor: VRAMMonitor, card: SimulatedBackend) -> dict[str, list[int]]:
    """Load the five models of the card as simulated allocations, through the registry."""
    handles = {}
    for name, size_gb in CARD_MODELS.items():
        with monitor.track_model_load(name, budget_gb=size_gb):
            handles[name] = allocate_exact(card, int(size_gb * GB))
    return handles
