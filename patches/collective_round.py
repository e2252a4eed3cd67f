"""The KV collector's collective step: plan a round's waiting agents together before SGLang admits them.

Target: ``sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority`` (BEFORE).  The scheduler calls it once
per prefill scheduling step with the whole waiting queue, before ``match_prefix``/``init_load_back`` run request by
request; the collective tree's :class:`~tokendance_sgl.collector.KVCollector` then chooses each round's canonical
bases from the agents present and makes their master copies in one batched re-rotation.  Other caches are left
alone; a failure is logged and the requests are served without the collective step.
"""

from __future__ import annotations

import logging

TARGET = "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority"

logger = logging.getLogger(__name__)


def _before_calc_priority(self, waiting_queue=None, *args, **kwargs):
    collector = getattr(getattr(self, "tree_cache", None), "collector", None)
    if collector is not None and waiting_queue:
        try:
            collector.collect(waiting_queue)
        except Exception:  # advisory: rows are still composed request by request
            logger.exception("tokendance: the collective step failed; composing rows per request")
    return None


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _before_calc_priority, HookType.BEFORE)
