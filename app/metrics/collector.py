"""A Prometheus collector that reads the monitor when scraped.

Nothing is updated on the generation loop's hot path: every figure is read here, at scrape
time, from one snapshot plus the monitor's counters, histograms and liveness. Every metric is
listed, with its type, unit and meaning, in docs/metrics.md (a test keeps the two equal).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from app._version import __version__
from app.monitor import VRAMMonitor
from app.monitor.records import HistogramState, ModelRecord

logger = logging.getLogger(__name__)

P = "icn_vortex_vram_"
CLEANUP_REASONS = ("soft_limit", "hard_limit", "oom", "http", "manual", "admission")
OUTCOMES = ("full", "degraded", "skipped", "aborted")
DECISIONS = ("admit", "cleanup", "refuse")

# name (without prefix) -> (help, snapshot attribute): device-wide gauges
_GAUGES = {
    "usage_bytes": ("Usage the limits apply to (allocated or reserved, see limit_basis).",
                    "usage_bytes"),
    "allocated_bytes": ("Bytes in live tensors (torch allocated).", "allocated_bytes"),
    "reserved_bytes": ("Bytes the caching allocator holds from the device.", "reserved_bytes"),
    "stage_peak_allocated_bytes": ("Allocator peak since the running (or last) stage or "
                                   "generation began: the monitor resets the peak register at "
                                   "each.", "stage_peak_allocated_bytes"),
    "total_bytes": ("Device memory this process may use.", "device_total_bytes"),
    "free_bytes": ("Free device memory.", "device_free_bytes"),
    "non_torch_bytes": ("Device memory held outside torch: CUDA context, other processes.",
                        "non_torch_bytes"),
    "soft_limit_bytes": ("Soft limit.", "soft_limit_bytes"),
    "hard_limit_bytes": ("Hard limit.", "hard_limit_bytes"),
    "fragmentation_bytes": ("Inactive split bytes: cached memory inside blocks in use, which "
                            "empty_cache cannot return.", "inactive_split_bytes"),
    "fragmentation_ratio": ("1 - largest_allocatable_bytes / fragmentation_free_bytes (in "
                            "whole 2 MiB steps, or pages): the share of free memory (device "
                            "room and the whole cache) that one allocation cannot get; also "
                            "under expandable_segments.", "fragmentation_ratio"),
    "leak_trend_bytes_per_generation": ("Least-squares slope of allocated bytes after each "
                                        "generation over the leak window.",
                                        "leak_bytes_per_generation"),
}
# name (without prefix) -> (help, key of the snapshot's fragmentation object): the cache as
# one large allocation sees it (placement.Fragmentation). fragmentation_ratio above is theirs.
_FRAGMENTATION = {
    "releasable_bytes": ("What a cleanup (empty_cache) would return now: whole free segments, "
                         "or whole free pages under expandable_segments.", "releasable_bytes"),
    "largest_free_block_bytes": ("The large pool's largest cached free block.",
                                 "largest_free_block_bytes"),
    "largest_allocatable_bytes": ("The largest single allocation the allocator can place now: "
                                  "a cached block, or a new segment in the room the device has "
                                  "once the releasable cache is returned.",
                                  "largest_allocatable_bytes"),
    "fragmentation_free_bytes": ("Free memory as the fragmentation ratio counts it: what may "
                                 "still be reserved (device, cap) plus the whole cache "
                                 "(reserved - allocated).", "free_bytes"),
}
# allocator_settings_info's labels, from the snapshot's allocator_settings
_SETTINGS_LABELS = ("expandable_segments", "max_split_size_mb", "garbage_collection_threshold",
                    "roundup_power2_divisions", "backend")
# name (without prefix and _total) -> (help, counters attribute)
_COUNTERS = {
    "soft_limit_violations": ("Soft limit excursions.", "soft_limit_violations"),
    "hard_limit_violations": ("Hard limit crossings and refused allocations.",
                              "hard_limit_violations"),
    "cleanup_freed_bytes": ("Reserved bytes returned to the device by cleanups.",
                            "cleanup_freed_bytes"),
    "generations": ("Generations measured.", "generations"),
    "generations_failed": ("Generations that ended in an exception (OOMs included).",
                           "generations_failed"),
    "ooms_caught": ("CUDA OOMs that escaped the guards inside a generation.", "ooms_caught"),
    "generations_peak_over_hard_limit": ("Generations whose allocated peak crossed the hard "
                                         "limit, those that ended under it (near misses) "
                                         "included.", "generations_peak_over_hard_limit"),
    "ooms_absorbed": ("Allocator OOMs inside a generation that did not end it: a kernel "
                      "caught them and went on (cuDNN tries its next plan when a workspace "
                      "does not fit). Not failures; a slot ran slower at worst.",
                      "ooms_absorbed"),
    "leak_warnings": ("Leak reports of the automatic detection.", "leak_warnings"),
    "backend_errors": ("Failed reads of the device by the monitor (the guards failed open).",
                       "backend_errors"),
}
# from the allocator itself (snapshot attribute)
_ALLOCATOR_COUNTERS = {
    "alloc_retries": ("Allocator retries after freeing its cache (num_alloc_retries).",
                      "num_alloc_retries"),
    "allocator_ooms": ("OOMs the allocator raised (num_ooms), those a kernel caught and retried "
                       "included: not failures by themselves (ooms_caught counts the slots "
                       "they ended, ooms_absorbed those retried).", "num_ooms"),
}
_HISTOGRAMS = {
    "generation_peak_bytes": ("peak", "Highest allocated bytes during each generation."),
    "generation_activation_bytes": ("activation", "Peak minus allocated bytes before each "
                                    "generation: what its activations took."),
    "generation_delta_bytes": ("delta", "Allocated bytes after minus before each generation."),
}


def _histogram(name: str, doc: str, device: str, h: HistogramState) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["device"])
    buckets = [(floatToGoString(b), c) for b, c in zip(h.bounds, h.cumulative_counts, strict=False)]
    buckets.append(("+Inf", h.count))
    fam.add_metric([device], buckets, h.total)
    return fam


def _gauge(name: str, doc: str, device: str, value: float | None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(P + name, doc, labels=["device"])
    if value is not None:
        g.add_metric([device], float(value))
    return g


def _settings_info(device: str, settings: Mapping[str, Any]) -> GaugeMetricFamily:
    """PYTORCH_ALLOC_CONF as the allocator applies it, as labels (always 1): what a
    fragmentation panel or alert is read against, and a fleet can be grouped by."""
    values = []
    for key in _SETTINGS_LABELS:
        value = settings.get(key)
        if key == "roundup_power2_divisions":
            value = _divisions(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        values.append("none" if value is None else str(value))  # max_split_size_mb unset
    info = GaugeMetricFamily(P + "allocator_settings_info", "The caching allocator's settings "
                             "(PYTORCH_ALLOC_CONF) in force, as labels; always 1.",
                             labels=["device", *_SETTINGS_LABELS])
    info.add_metric([device, *values], 1.0)
    return info


def _divisions(value: object) -> str:
    """The divisions of the 16 size intervals (1 MiB, 2 MiB, ... 32 GiB and above): one
    number when all agree (``0``: off, the default), else all 16, comma-separated."""
    if not isinstance(value, list | tuple) or not value:
        return ""
    if len(set(value)) == 1:
        return str(value[0])
    return ",".join(str(v) for v in value)


class VRAMCollector:
    """Register on the control plane's own ``CollectorRegistry``, or on a Director's."""

    def __init__(self, monitor: VRAMMonitor) -> None:
        self._monitor = monitor
        backend = monitor.backend
        self._build = {"version": __version__, "torch": torch.__version__,
                       "cuda": torch.version.cuda or "", "device": monitor.device,
                       "device_name": backend.name, "device_uuid": backend.uuid or ""}

    def describe(self) -> Iterator[Metric]:
        # Names and types only, so registering does not read the backend.
        for name in ("backend_up", "ready", "build_info", *_GAUGES, *_FRAGMENTATION,
                     "allocator_settings_info",
                     "leak_generations_to_hard_limit", "post_generation_allocated_bytes",
                     "last_generation_timestamp_seconds", "generation_running_seconds",
                     "forecast_peak_bytes", "forecast_headroom_bytes"):
            yield GaugeMetricFamily(P + name, "")
        for name in (*_COUNTERS, *_ALLOCATOR_COUNTERS, "emergency_cleanups",
                     "cleanup_failures", "slot_outcomes", "admissions"):
            yield CounterMetricFamily(P + name, "")
        for name in ("model_bytes", "model_budget_bytes", "model_over_budget"):
            yield GaugeMetricFamily(P + name, "")
        for name in _HISTOGRAMS:
            yield HistogramMetricFamily(P + name, "")

    def collect(self) -> Iterator[Metric]:
        m = self._monitor
        device = m.device
        try:
            snap = m.snapshot("scrape")
        except Exception:
            # The counters below still describe the node; the gauges would be lies.
            logger.exception("VRAM backend read failed during a scrape")
            snap = None
        live = m.liveness()
        models = m.models()
        yield _gauge("backend_up", "1 if the last backend read succeeded.", device,
                     0.0 if snap is None else 1.0)
        ready = m.readiness().ready
        yield _gauge("ready", "1 while /readyz would answer 200: pre-flight passed, models "
                     "registered, no generation stalled, slots produced.", device,
                     1.0 if ready else 0.0)
        yield _gauge("slots_lost_in_a_row", "Slots skipped or aborted since the last one "
                     "produced; /readyz says not_producing from VORTEX_NOT_PRODUCING_AFTER.",
                     device, float(live.lost_in_a_row))
        info = GaugeMetricFamily(P + "build_info", "Versions and the device, as labels; "
                                 "always 1.", labels=list(self._build))
        info.add_metric(list(self._build.values()), 1.0)
        yield info

        if snap is not None:
            for name, (doc, attr) in _GAUGES.items():
                yield _gauge(name, doc, device, getattr(snap, attr))
            for name, (doc, key) in _FRAGMENTATION.items():
                yield _gauge(name, doc, device, snap.fragmentation.get(key))
            yield _settings_info(device, snap.allocator_settings)
            yield _gauge("leak_generations_to_hard_limit",
                         "Generations before the hard limit at the leak trend (absent when "
                         "flat).", device, snap.leak_generations_to_hard_limit)
            for name, (doc, attr) in _ALLOCATOR_COUNTERS.items():
                c = CounterMetricFamily(P + name, doc, labels=["device"])
                c.add_metric([device], float(getattr(snap, attr)))
                yield c
            yield _gauge("forecast_peak_bytes", "Admission forecast of the next slot's peak, on "
                         "the limit basis (current usage while there is no history).", device,
                         snap.forecast_peak_bytes)
            yield _gauge("forecast_headroom_bytes", "Hard limit minus the forecast peak "
                         "(negative: the next slot would be refused).", device,
                         snap.forecast_headroom_bytes)
        yield _gauge("post_generation_allocated_bytes", "Allocated bytes after the last "
                     "generation: the level leak detection watches.", device,
                     live.post_generation_allocated_bytes)
        yield _gauge("last_generation_timestamp_seconds", "Unix time the last generation "
                     "ended (absent before the first).", device, live.last_generation_at)
        yield _gauge("generation_running_seconds", "How long the running generation has "
                     "run; 0 when idle.", device, live.running_s)

        counters = m.counters()
        for name, (doc, attr) in _COUNTERS.items():
            c = CounterMetricFamily(P + name, doc, labels=["device"])
            c.add_metric([device], float(getattr(counters, attr)))
            yield c
        ran, failed = m.cleanups_by_reason()
        outcomes, admissions = m.slot_counts()
        # Every known label value, 0 included: a rate over a series that appears only at its
        # first increment misses that increment, and ratios need their denominators.
        for name, doc, label, known, counts in (
                ("emergency_cleanups", "Emergency cleanups run, by who asked for them.",
                 "reason", CLEANUP_REASONS, ran),
                ("cleanup_failures", "Emergency cleanups that failed, by who asked for them.",
                 "reason", CLEANUP_REASONS, failed),
                ("slot_outcomes", "Slots by outcome: full, degraded (ran below full size), "
                 "skipped (before any stage ran) or aborted (failed mid-slot).", "outcome",
                 OUTCOMES, outcomes),
                ("admissions", "Admission decisions taken before slots.", "decision",
                 DECISIONS, admissions)):
            c = CounterMetricFamily(P + name, doc, labels=["device", label])
            for value in sorted(set(known) | set(counts)):
                c.add_metric([device, value], float(counts.get(value, 0)))
            yield c

        yield from self._models(device, models)
        histograms = m.histograms()
        for name, (field, doc) in _HISTOGRAMS.items():
            yield _histogram(P + name, doc, device, getattr(histograms, field))

    def _models(self, device: str, models: list[ModelRecord]) -> Iterator[Metric]:
        labels = ["device", "model"]
        mb = GaugeMetricFamily(P + "model_bytes", "Resident bytes of each model.", labels=labels)
        mbud = GaugeMetricFamily(P + "model_budget_bytes", "Budget of each model.",
                                 labels=labels)
        mover = GaugeMetricFamily(P + "model_over_budget",
                                  "1 if the model holds more than its budget.", labels=labels)
        for rec in models:
            mb.add_metric([device, rec.name], float(rec.vram_bytes))
            if rec.budget_bytes is not None:
                mbud.add_metric([device, rec.name], float(rec.budget_bytes))
                mover.add_metric([device, rec.name], 1.0 if rec.over_budget else 0.0)
        yield from (mb, mbud, mover)
