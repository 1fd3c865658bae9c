"""The monitor core. Imports nothing from the web layer."""

from app.monitor.monitor import VRAMMonitor
from app.monitor.records import (
    Admission,
    CleanupResult,
    Forecast,
    GenerationRecord,
    LeakTrend,
    Liveness,
    ModelRecord,
    MonitorCounters,
    PreflightResult,
    VRAMSnapshot,
)

__all__ = [
    "Admission",
    "CleanupResult",
    "Forecast",
    "GenerationRecord",
    "LeakTrend",
    "Liveness",
    "ModelRecord",
    "MonitorCounters",
    "PreflightResult",
    "VRAMMonitor",
    "VRAMSnapshot",
]
