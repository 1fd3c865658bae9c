"""Write docs/api.md from the library's docstrings: the public names of ``app`` and what they do.

    python tools/api_reference.py            # rewrite docs/api.md
    python tools/api_reference.py --check    # exit 1 when docs/api.md is not what it would write

The page is generated, not written by hand, so it cannot drift from the code:
``tests/unit/test_api_reference.py`` fails when the two differ. Every name ``app`` exports
appears, in the order of ``SECTIONS``; a class shows its public methods and properties (and a
dataclass its fields), each with its signature and docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "api.md"

SECTIONS = (
    ("The monitor", ("VRAMMonitor", "MIN_SCALE")),
    ("What it hands out", ("Admission", "Forecast", "GenerationRecord", "ModelRecord",
                           "VRAMSnapshot")),
    ("Admission by rehearsal", ("SlotPreset", "StagePlan", "Rehearsal")),
    ("Backends: where `backend=` goes", ("MemoryBackend", "SimulatedBackend", "CudaBackend")),
    ("Real PyTorch code on the simulated card", ("simulated_rtx_3060", "as_loaded", "Capture",
                                                 "AllocationTrace", "flash_attention")),
    ("The process-wide guards", ("install_monitor", "get_monitor", "check_limits",
                                 "check_allocation", "get_current_vram_usage",
                                 "get_vram_breakdown", "clear_cuda_cache")),
    ("Errors and warnings", ("MemoryPressureError", "MemoryPressureWarning",
                             "MemoryLeakWarning", "AccountingWarning", "CleanupCooldownError",
                             "VortexInitializationError", "SettingsError",
                             "ControlPlaneError")),
    ("Settings and the control plane", ("Settings", "load_settings", "start_control_plane",
                                        "ControlPlane", "create_app")),
)
_SKIP = {"__version__"}


def _doc(obj: object, name: str = "") -> str:
    """The docstring; for a backend's method without one, the protocol's (a backend says
    what it does through ``MemoryBackend``)."""
    doc = inspect.getdoc(obj)
    if not doc and name:
        from app.backends import MemoryBackend

        doc = inspect.getdoc(getattr(MemoryBackend, name, None)) if hasattr(
            MemoryBackend, name) else None
        if doc:
            doc = f"As ``MemoryBackend.{name}``: {doc}"
    return doc or "(undocumented)"


def _signature(name: str, obj: object) -> str:
    for eval_str in (True, False):  # annotations as types where they evaluate
        try:
            sig = inspect.signature(obj, eval_str=eval_str)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return name
        except NameError:
            continue
        params = [p for p in sig.parameters.values() if p.name != "self"]
        text = str(sig.replace(parameters=params)).replace("typing.", "")
        return f"{name}{text}".replace("'", "") if not eval_str else f"{name}{text}"
    return name


def _settings(cls: type) -> list[str]:
    """A pydantic settings class: its variables, defaults and descriptions."""
    from app.config import env_name

    lines = ["| variable | default | what |", "| --- | --- | --- |"]
    for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
        default = "" if field.default is None else f"`{field.default}`"
        lines.append(f"| `{env_name(name)}` | {default} | {field.description or ''} |")
    return lines


def _members(cls: type) -> list[str]:
    out = []
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or (name not in vars(cls) and not any(
                name in vars(base) for base in cls.__mro__[1:-1]
                if base.__module__.startswith("app"))):
            continue
        if isinstance(member, property):
            out.append(f"- **`{name}`** (property): {_doc(member.fget, name).splitlines()[0]}")
        elif inspect.isfunction(member) or inspect.ismethod(member):
            doc = _doc(member, name).replace("\n", "\n  ")
            out.append(f"- **`{_signature(name, member)}`**\n\n  {doc}")
    return out


def _entry(name: str, obj: object) -> list[str]:
    lines = [f"### `{name}`", ""]
    if inspect.isclass(obj) and hasattr(obj, "model_fields"):  # Settings
        return [*lines, "*class*", "", _doc(obj), "", *_settings(obj), ""]
    if inspect.isclass(obj):
        kind = "exception" if issubclass(obj, BaseException) else "class"
        lines += [f"*{kind}* `{_signature(name, obj)}`" if kind == "class" else f"*{kind}*",
                  "", _doc(obj), ""]
        if dataclasses.is_dataclass(obj):
            lines += ["Fields: " + ", ".join(f"`{f.name}`" for f in dataclasses.fields(obj)),
                      ""]
        if not issubclass(obj, BaseException):
            lines += _members(obj)
            lines.append("")
    elif callable(obj):
        lines += [f"`{_signature(name, obj)}`", "", _doc(obj), ""]
    else:
        lines += [f"`{name} = {obj!r}`", ""]
    return lines


def render() -> str:
    app = importlib.import_module("app")
    listed = [n for _, names in SECTIONS for n in names]
    missing = sorted(set(app.__all__) - set(listed) - _SKIP)
    if missing:
        raise SystemExit(f"tools/api_reference.py: exported but not in SECTIONS: {missing}")
    lines = ["# API reference", "",
             "Generated from the docstrings by `python tools/api_reference.py`; a test keeps "
             "it current. Everything below is importable from `app` (`from app import "
             "VRAMMonitor`). Bytes are ints; GB (10^9 bytes) only at the edges.", ""]
    for title, names in SECTIONS:
        lines += [f"## {title}", ""]
        for name in names:
            lines += _entry(name, getattr(app, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print("docs/api.md is stale: run python tools/api_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
