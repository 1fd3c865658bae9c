"""The monitor core. Imports nothing from the web layer."""

from app.monitor.admission import MIN_SCALE
from app.monitor.monitor import VRAMMonitor
from app.monitor.presets import SlotPreset, StagePlan
from app.monitor.records import (
    Admission,
    CleanupAttempt,
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
    "MIN_SCALE",
    "Admission",
    "CleanupAttempt",
    "CleanupResult",
    "Forecast",
    "GenerationRecord",
    "LeakTrend",
    "Liveness",
    "ModelRecord",
    "MonitorCounters",
    "PreflightResult",
    "SlotPreset",
    "StagePlan",
    "VRAMMonitor",
    "VRAMSnapshot",
]
