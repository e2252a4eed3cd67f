"""The collective tree's counters as Prometheus gauges on SGLang's ``/metrics`` (``--enable-metrics``).

SGLang's scheduler process writes its metrics through ``prometheus_client`` in multiprocess mode and the HTTP
server exports them all; :class:`TreeMetrics` adds ``tokendance:*`` gauges there, with the scheduler's own labels,
refreshed every time SGLang logs its scheduler stats (prefill batches, decode log intervals, idle). Gauges, not
counters: a flush resets the per-round numbers and ``prepass_largest_forward`` is a maximum.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

__all__ = ["EXPORTED", "TreeMetrics", "attach", "current_tree", "snapshot"]

# name -> help text; every name is a counter of TreeStats or a value computed by snapshot()
EXPORTED = {
    "rows_composed": "Rows composed from reused segments (cumulative).",
    "reused_tokens": "Segment tokens read from shared masters (cumulative).",
    "recomputed_tokens": "Segment tokens recomputed in their new context (cumulative).",
    "collect_steps": "Collective steps run: rounds of waiting agents planned together (cumulative).",
    "rollbacks": "Compositions or pre-passes that failed and were undone; the request ran as plain prefill.",
    "prepass_fallbacks": "Pre-passes that failed; their composed regions were computed in full.",
    "prepass_largest_forward": "Query tokens of the largest pre-pass forward.",
    "diff_slots": "Private diff slots of the live composed rows.",
    "master_slots": "KV slots held by segment masters and their re-rotated copies.",
    "kv_bytes_per_agent": "KV bytes the live rows hold per agent (masters divided among their readers).",
}

_tree: Optional[weakref.ref] = None


def attach(tree: Any) -> None:
    """Makes ``tree`` the collective tree of this (scheduler) process."""
    global _tree
    _tree = weakref.ref(tree)


def current_tree() -> Optional[Any]:
    return _tree() if _tree is not None else None


def snapshot(tree: Any) -> dict:
    """The exported values of ``tree`` (cost: the live rows and the segments, not the pool)."""
    counters = tree.stats.counters
    by_agent = tree.kv_bytes_by_agent()
    return {
        **{k: counters[k] for k in EXPORTED if k in counters},
        "diff_slots": tree.diff.private_tokens(),
        "master_slots": tree.store.master_slots(),
        "kv_bytes_per_agent": float(sum(by_agent.values()) / len(by_agent)) if by_agent else 0.0,
    }


class TreeMetrics:
    """The ``tokendance:*`` gauges of one SGLang scheduler metrics collector (``labels``: its labels)."""

    def __init__(self, labels: dict):
        from prometheus_client import Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        self.labels = dict(labels)
        self.gauges = {name: Gauge(name=f"tokendance:{name}", documentation=doc, labelnames=list(self.labels),
                                   multiprocess_mode="mostrecent") for name, doc in EXPORTED.items()}

    def update(self, tree: Any) -> None:
        for name, value in snapshot(tree).items():
            gauge = self.gauges[name]
            (gauge.labels(**self.labels) if self.labels else gauge).set(value)
