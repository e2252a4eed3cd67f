"""The text before a composed region, computed by SGLang's own chunked prefill.

The region the collective tree offers a request (its host hit, :func:`tokendance_sgl.reuse.plan_layout`) starts
where the request's cached prefix ends. Text of the prompt's own before the first reused segment -- the *lead*: a
first round's private history, an agent's new turn -- is plain prefill. A lead whose region fits what is left of the
step's chunk rides the pre-pass (its first forward, a plain extend budgeted with the region). A longer one is left to
SGLang:

1. **At admission** (:func:`lead_cut`, asked from ``PrefillAdder.add_one_req``) the request is admitted without its
   host hit, and its prefill is cut at the start of the page holding the region's first token
   (``RequestState.lead_cut``; the rest of that page, if any, stays in the pre-pass). SGLang computes
   the lead as its own extend, in as many chunks as its budget gives (each ends at the cut at the latest), and
   checkpoints it into the tree like any chunk.
2. **At the cut** (:func:`compose_after_lead`, from ``PrefillAdder.add_chunked_req``) the region is planned again
   from there and composed through ``init_load_back``, as at admission. Its slots are written into the request's
   row, the request's prefix and ``cache_protected_len`` move past it, and its pre-pass is charged to the step's
   chunk. SGLang's chunked prefill goes on after the region.

SGLang tracks one chunked request at a time, and a cut ends the step's admissions as any truncated chunk does. While
a request is being chunked, another one keeps its lead in the pre-pass if its region fits what is left of the chunk,
and otherwise waits until it can be cut. A region that cannot be composed at the cut (a segment evicted meanwhile,
no room) is prefilled by SGLang like the rest of the prompt.
"""

from __future__ import annotations

import logging
from typing import Any

from tokendance_sgl.request_state import state_of
from tokendance_sgl.reuse import plan_layout, prepass_tokens

__all__ = ["lead_cut", "compose_after_lead"]

logger = logging.getLogger(__name__)


def lead_cut(tree: Any, adder: Any, req: Any, has_chunked_req: bool) -> int:
    """The row at which ``req``'s prefill is cut so that SGLang computes its lead (0: admit it as planned)."""
    st = getattr(req, "td", None)
    layout = st.layout if st is not None else None
    room = adder.rem_chunk_tokens
    if layout is None or room is None or has_chunked_req or adder.new_chunked_req is not None:
        return 0
    if not layout.policy.reuses_masters:  # `full` recomputes its whole region through the pre-pass machinery
        return 0
    cut = layout.region_start // tree.page_size * tree.page_size
    if cut <= layout.start or prepass_tokens(layout) < room:
        return 0  # no whole page of lead, or the region fits this step's chunk: the pre-pass computes the lead
    return cut


def compose_after_lead(tree: Any, req: Any) -> int:
    """Composes ``req``'s region now that SGLang has computed its lead (the request's prefix ends at the cut).
    Returns the tokens its pre-pass computes at most (0: nothing was composed; SGLang prefills the rest)."""
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

    st = state_of(req)
    try:
        tree.plan_for(req)
        limit = req._compute_max_prefix_len(len(req.full_untruncated_fill_ids))
        layout = plan_layout(tree, req, req.prefix_len, limit, st.positions)
    except Exception:  # planning is advisory; never take the scheduler down
        logger.exception("tokendance: planning the region of request %s after its lead failed", req.rid)
        layout = None
    if layout is None:
        tree.stats.counters["lead_regions_lost"] += 1
        return 0
    st.layout = layout
    n = layout.end - layout.start
    loaded, _ = tree.init_load_back(InitLoadBackParams(best_match_node=req.last_node, host_hit_length=n, req=req))
    if not loaded:
        st.layout = None
        return 0
    tree.write_row(req, layout.start, st.host_slots)
    req.prefix_len = layout.end
    req.kv.cache_protected_len = layout.end  # the composed region is the tree's, as after a load-back
    tree.stats.counters["lead_chunks"] += 1
    return prepass_tokens(layout)
