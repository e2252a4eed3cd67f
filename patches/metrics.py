"""Export the collective tree's counters on SGLang's ``/metrics`` (:mod:`tokendance_sgl.metrics`).

Target: ``sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats`` (AFTER; scheduler
process, only with ``--enable-metrics``, where SGLang builds that collector). Whenever SGLang logs its scheduler
stats, the ``tokendance:*`` gauges (made at the first call, with the collector's labels) are refreshed from this
process's collective tree. A process whose cache is not a collective tree exports nothing of ours.
"""

from __future__ import annotations

import logging

TARGET = "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats"

logger = logging.getLogger(__name__)
_metrics = None  # this process's TreeMetrics (one scheduler per process)


def _after_log_stats(result, self, *args, **kwargs):
    global _metrics
    from tokendance_sgl.metrics import TreeMetrics, current_tree

    tree = current_tree()
    if tree is None:
        return result
    try:
        if _metrics is None:
            _metrics = TreeMetrics(getattr(self, "labels", None) or {})
        _metrics.update(tree)
    except Exception:  # metrics never take the scheduler down
        logger.exception("tokendance: exporting the metrics failed")
    return result


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _after_log_stats, HookType.AFTER)
