"""The monitor core. Imports nothing from the web layer."""

from app.monitor.monitor import VRAMMonitor
from app.monitor.records import (
    CleanupResult,
    GenerationRecord,
    LeakTrend,
    ModelRecord,
    MonitorCounters,
    PreflightResult,
    VRAMSnapshot,
)

__all__ = [
    "CleanupResult",
    "GenerationRecord",
    "LeakTrend",
    "ModelRecord",
    "MonitorCounters",
    "PreflightResult",
    "VRAMMonitor",
    "VRAMSnapshot",
]
