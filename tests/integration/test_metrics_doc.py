"""docs/metrics.md lists exactly what a live /metrics serves: names, types and labels."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app import start_control_plane
from tests.integration.helpers import ROOT

DOC = ROOT / "docs/metrics.md"
ROW = re.compile(r"^\| `(?P<name>[a-z_:]+)` \| (?P<type>\w+) \|[^|]*\|\s*(?P<labels>[^|]*?)\s*\|")


def _documented() -> dict[str, tuple[str, frozenset[str]]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            labels = frozenset(x.strip() for x in m["labels"].split(",") if x.strip())
            rows[m["name"]] = (m["type"], labels)
    assert len(rows) > 40, "the table was not found"
    return rows


def _served(text: str) -> dict[str, tuple[str, frozenset[str] | None]]:
    """Family name as exposed (counters with _total), its type, and its labels (None for a
    family that has no sample right now, such as a gauge absent while flat)."""
    served = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels} - {"le"}
        served[name] = (fam.type, frozenset(labels) if fam.samples else None)
    return served


def test_the_metrics_page_matches_a_live_scrape(node):
    monitor, card = node
    for slot in range(3):  # figures in every family: generations, an admission, a cleanup
        monitor.admit(slot)
        with monitor.generation(slot), monitor.stage("flux"):
            card.free(card.allocate(200 << 20))
    monitor.emergency_cleanup()
    with start_control_plane(monitor, port=0, metrics_ttl_s=0) as cp:
        httpx.get(f"{cp.url}/healthz")
        served = _served(httpx.get(f"{cp.url}/metrics").text)
    documented = _documented()
    assert set(served) == set(documented), (
        f"served, not documented: {sorted(set(served) - set(documented))}; "
        f"documented, not served: {sorted(set(documented) - set(served))}")
    for name, (kind, labels) in served.items():
        doc_kind, doc_labels = documented[name]
        assert kind == doc_kind, name
        if labels is not None:
            assert labels == doc_labels, name
