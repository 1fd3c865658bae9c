"""Prometheus metrics read from the monitor at scrape time."""

from app.metrics.collector import VRAMCollector

__all__ = ["VRAMCollector"]
