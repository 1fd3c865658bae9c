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
