"""A Prometheus collector that reads the monitor when scraped.

Nothing is updated on the generation loop's hot path: every figure is read here, at scrape
time, from one snapshot plus the monitor's counters and histograms.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from app.monitor import VRAMMonitor
from app.monitor.records import HistogramState

logger = logging.getLogger(__name__)

P = "icn_vortex_vram_"

# name (without prefix) -> (help, snapshot attribute): device-wide gauges
_GAUGES = {
    "usage_bytes": ("Usage the limits apply to (allocated or reserved, see limit_basis).",
                    "usage_bytes"),
    "allocated_bytes": ("Bytes in live tensors (torch allocated).", "allocated_bytes"),
    "reserved_bytes": ("Bytes the caching allocator holds from the device.", "reserved_bytes"),
    "peak_allocated_bytes": ("Allocator peak since its last reset (the monitor resets it per "
                             "generation).", "peak_allocated_bytes"),
    "total_bytes": ("Device memory this process may use.", "device_total_bytes"),
    "free_bytes": ("Free device memory.", "device_free_bytes"),
    "non_torch_bytes": ("Device memory held outside torch: CUDA context, other processes.",
                        "non_torch_bytes"),
    "soft_limit_bytes": ("Soft limit.", "soft_limit_bytes"),
    "hard_limit_bytes": ("Hard limit.", "hard_limit_bytes"),
    "fragmentation_bytes": ("Inactive split bytes: cached memory inside blocks in use, which "
                            "empty_cache cannot return.", "inactive_split_bytes"),
    "fragmentation_ratio": ("Inactive split bytes / reserved bytes.", "fragmentation_ratio"),
    "leak_trend_bytes_per_generation": ("Least-squares slope of allocated bytes after each "
                                        "generation over the leak window.",
                                        "leak_bytes_per_generation"),
}
# name (without prefix and _total) -> (help, counters attribute)
_COUNTERS = {
    "soft_limit_violations": ("Soft limit excursions.", "soft_limit_violations"),
    "hard_limit_violations": ("Hard limit violations and refused allocations.",
                              "hard_limit_violations"),
    "emergency_cleanups": ("Emergency cleanups run.", "emergency_cleanups"),
    "cleanup_freed_bytes": ("Reserved bytes returned to the device by cleanups.",
                            "cleanup_freed_bytes"),
    "generations": ("Generations measured.", "generations"),
    "generations_failed": ("Generations that ended in an exception.", "generations_failed"),
    "ooms_caught": ("CUDA OOMs that escaped the guards inside a generation.", "ooms_caught"),
    "leak_warnings": ("Leak windows that grew past the threshold.", "leak_warnings"),
    "monitor_errors": ("Backend reads that failed.", "monitor_errors"),
}
# from the allocator itself (snapshot attribute)
_ALLOCATOR_COUNTERS = {
    "alloc_retries": ("Allocator retries after freeing its cache (num_alloc_retries).",
                      "num_alloc_retries"),
    "allocator_ooms": ("OOMs the allocator raised (num_ooms).", "num_ooms"),
}
_HISTOGRAMS = {
    "generation_peak_bytes": "Highest allocated bytes during each generation.",
    "generation_delta_bytes": "Allocated bytes after minus before each generation.",
}


def _histogram(name: str, doc: str, device: str, h: HistogramState) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["device"])
    buckets = [(floatToGoString(b), c) for b, c in zip(h.bounds, h.cumulative_counts, strict=False)]
    buckets.append(("+Inf", h.count))
    fam.add_metric([device], buckets, h.total)
    return fam


class VRAMCollector:
    """Register on the control plane's own ``CollectorRegistry``."""

    def __init__(self, monitor: VRAMMonitor) -> None:
        self._monitor = monitor

    def describe(self) -> Iterator[Metric]:
        # Names and types only, so registering does not read the backend.
        yield GaugeMetricFamily(P + "backend_up", "")
        yield GaugeMetricFamily(P + "ready", "")
        for name in _GAUGES:
            yield GaugeMetricFamily(P + name, "")
        yield GaugeMetricFamily(P + "leak_generations_to_hard_limit", "")
        for name in (*_COUNTERS, *_ALLOCATOR_COUNTERS):
            yield CounterMetricFamily(P + name, "")
        for name in ("model_bytes", "model_budget_bytes", "model_over_budget"):
            yield GaugeMetricFamily(P + name, "")
        for name in _HISTOGRAMS:
            yield HistogramMetricFamily(P + name, "")

    def collect(self) -> Iterator[Metric]:
        m = self._monitor
        device = m.device
        labels = ["device"]
        try:
            snap = m.snapshot("scrape")
        except Exception:
            # The counters below still describe the node; the gauges would be lies.
            logger.exception("VRAM backend read failed during a scrape")
            snap = None
        up = GaugeMetricFamily(P + "backend_up", "1 if the last backend read succeeded.",
                               labels=labels)
        up.add_metric([device], 0.0 if snap is None else 1.0)
        yield up
        ready = GaugeMetricFamily(P + "ready", "1 once pre-flight passed and models are "
                                  "registered.", labels=labels)
        ready.add_metric([device], 1.0 if m.preflight_passed and m.models() else 0.0)
        yield ready

        if snap is not None:
            for name, (doc, attr) in _GAUGES.items():
                g = GaugeMetricFamily(P + name, doc, labels=labels)
                g.add_metric([device], float(getattr(snap, attr)))
                yield g
            left = snap.leak_generations_to_hard_limit
            g = GaugeMetricFamily(
                P + "leak_generations_to_hard_limit",
                "Generations before the hard limit at the leak trend (absent when flat).",
                labels=labels)
            if left is not None:
                g.add_metric([device], float(left))
            yield g
            for name, (doc, attr) in _ALLOCATOR_COUNTERS.items():
                c = CounterMetricFamily(P + name, doc, labels=labels)
                c.add_metric([device], float(getattr(snap, attr)))
                yield c

        counters = m.counters()
        for name, (doc, attr) in _COUNTERS.items():
            c = CounterMetricFamily(P + name, doc, labels=labels)
            c.add_metric([device], float(getattr(counters, attr)))
            yield c

        models = m.models()
        mb = GaugeMetricFamily(P + "model_bytes", "Resident bytes of each model.",
                               labels=["device", "model"])
        mbud = GaugeMetricFamily(P + "model_budget_bytes", "Budget of each model.",
                                 labels=["device", "model"])
        mover = GaugeMetricFamily(P + "model_over_budget",
                                  "1 if the model holds more than its budget.",
                                  labels=["device", "model"])
        for rec in models:
            mb.add_metric([device, rec.name], float(rec.vram_bytes))
            if rec.budget_bytes is not None:
                mbud.add_metric([device, rec.name], float(rec.budget_bytes))
                mover.add_metric([device, rec.name], 1.0 if rec.over_budget else 0.0)
        yield mb
        yield mbud
        yield mover

        peak, delta = m.histograms()
        yield _histogram(P + "generation_peak_bytes", _HISTOGRAMS["generation_peak_bytes"],
                         device, peak)
        yield _histogram(P + "generation_delta_bytes", _HISTOGRAMS["generation_delta_bytes"],
                         device, delta)
