"""``GET /tokendance/stats``: the prefix cache's TokenDance counters, read from the scheduler process.

Targets:
  * ``sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state``
    (AFTER, scheduler process): adds a ``"tokendance"`` entry to SGLang's own internal-state reply, so the numbers
    travel over SGLang's existing IPC (``TokenizerManager.get_internal_state``).
  * ``sglang.srt.entrypoints.http_server.app`` (main process): a GET route that asks for that state.

Every backend reports the pool view (slots in use, evictable, protected); the collective tree adds its own
counters and the KV bytes per agent.
"""

from __future__ import annotations

import os

STATE_TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"
)
ROUTE = "/tokendance/stats"


def scheduler_stats(scheduler) -> dict:
    from tokendance_sgl.accounting import pool_bytes_per_token
    from tokendance_sgl.collective_tree import CollectiveTree

    tree = scheduler.tree_cache
    allocator = scheduler.token_to_kv_pool_allocator
    total = int(scheduler.max_total_num_tokens)
    available = int(allocator.available_size())
    stats = {
        "kv_backend": os.environ.get("TOKENDANCE_KV_BACKEND", "radix"),
        "cache_class": type(tree).__name__,
        "max_total_num_tokens": total,
        "available_size": available,
        "evictable_size": int(tree.evictable_size()),
        "protected_size": int(tree.protected_size()),
        "used_slots": total - available,
        "kv_bytes_per_token": pool_bytes_per_token(allocator),
    }

    if isinstance(tree, CollectiveTree):
        stats.update(tree.report())
        stats["kv_bytes_by_agent"] = {str(k): v for k, v in tree.kv_bytes_by_agent().items()}
        stats["kv_bytes_by_agent_cumulative"] = {str(k): v for k, v in tree.stats.cum_bytes_by_agent.items()}
    return stats


def _after_get_internal_state(result, self, *args, **kwargs):
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["tokendance"] = scheduler_stats(self.scheduler)
    return result


def add_route() -> None:
    from fastapi.responses import ORJSONResponse
    from sglang.srt.entrypoints import http_server

    if any(getattr(r, "path", None) == ROUTE for r in http_server.app.routes):
        return

    async def tokendance_stats():
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        ranks = [s.get("tokendance") for s in states if isinstance(s, dict)]
        if not ranks or ranks[0] is None:
            return ORJSONResponse(status_code=503, content={"error": "the scheduler reported no TokenDance state"})
        return ORJSONResponse(ranks[0] if len(ranks) == 1 else {"dp_ranks": ranks})

    http_server.app.add_api_route(ROUTE, tokendance_stats, methods=["GET"])


def register_hooks(main_process: bool) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(STATE_TARGET, _after_get_internal_state, HookType.AFTER)
    if main_process:
        add_route()
