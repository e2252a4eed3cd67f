"""A finished request's output registered as a segment (``CollectiveTree.checkpoint`` of a finished request).

A request whose segment table names its output (``td_out_seg``) registers it **strong**: the segment holds the
output's pages, so the KV outlives the request's radix path (the next round's prompts reuse it). Without a table, an
output of at least ``min_segment_len`` tokens is registered **weak** when ``auto_register`` is on: it refers to pages
the radix tree holds and goes with them (detection finds it in later prompts). The output's slots are known on the
host from the row's copy (:mod:`tokendance_sgl.slot_mirror`).
"""

from __future__ import annotations

import logging
from typing import Any

from tokendance_sgl.planning import ns_key_of, table_of
from tokendance_sgl.request_state import state_of
from tokendance_sgl.segments import SegmentTableError

logger = logging.getLogger(__name__)

__all__ = ["register_output"]


def register_output(tree: Any, req: Any, up_to: int) -> None:
    """Registers ``req``'s output (its KV rows up to ``up_to``) as a segment of ``tree``'s store (module docstring);
    an aborted request registers nothing."""
    if type(getattr(req, "finished_reason", None)).__name__ == "FINISH_ABORT":
        return
    out = getattr(req, "output_ids_through_stop", None)
    out = req.output_ids if out is None else out
    if len(out) == 0:
        return
    try:
        table = table_of(req)
    except SegmentTableError as e:
        logger.warning("request %s: ignoring its segment table at registration: %s", getattr(req, "rid", "?"), e)
        table = None
    out_seg = table.out_seg if table is not None else None
    strong = out_seg is not None
    if not strong and (not tree.config.auto_register or len(out) < tree.config.min_segment_len):
        return
    kv_start = len(req.origin_input_ids)
    kv_end = min(int(up_to), kv_start + len(out))
    if not strong:
        kv_end = min(kv_end, req.kv.cache_protected_len)  # a weak segment refers to pages the radix holds
    row = tree.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    master = row[kv_start:kv_end] if kv_end > kv_start else None  # (the store copies it)
    if master is None and not strong:
        return
    st = state_of(req)
    # the output's slots are known on the host: the row's copy (the path the checkpoint wrote, then the decode)
    host = (tree.row_mirror.get(req.kv.req_pool_idx, kv_start, kv_end)
            if master is not None and tree.row_mirror is not None else None)
    # a strong segment holds its pages: a part still in the request's range stays with it when the row is freed
    node, _ = tree.store.register(
        out, master, anchor=st.positions.position_of(kv_start),
        round=table.round if table is not None else None, agent=table.agent if table is not None else None,
        seg_id=out_seg, ns_key=ns_key_of(req, table.ns if table is not None else ""), strong=strong,
        fresh=True, master_host=host)  # the output's own slots
    if node is not None:
        st.registered = node.key
