"""docs/api.md is generated from the docstrings (tools/api_reference.py): it must be current,
and every name ``app`` exports must be in it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("api_reference",
                                                  ROOT / "tools" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_is_current():
    text = _generator().render()
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == text, (
        "docs/api.md is stale: run python tools/api_reference.py")


def test_every_export_is_documented():
    import app

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in set(app.__all__) - {"__version__"}:
        assert f"### `{name}`" in text, name
    assert "(undocumented)" not in text


def test_every_name_it_lists_imports_from_app():
    """Issue 25 (2): the reference says everything in it imports from ``app``; it named
    ``simulated_rtx_3060``'s module only, and ``from app import simulated_rtx_3060`` failed."""
    import re

    import app

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = re.findall(r"^### `([^`]+)`$", text, flags=re.M)
    assert {"simulated_rtx_3060", "flash_attention", "Capture"} <= set(listed)
    for name in listed:
        exec(f"from app import {name}", {})
    assert set(listed) == set(app.__all__) - {"__version__"}
    capture = text[text.index("### `Capture`"):text.index("### `AllocationTrace`")]
    assert "**`mark(" in capture and "**`trace(" in capture
