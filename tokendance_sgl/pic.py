"""``--kv-backend pic``: per-request position-independent reuse, the CacheBlend/EPIC-style baseline.

Every request is served on its own, the way a per-request PIC system does it:

* each registered segment found in its prompt is **copied into the request's private slots** with its K
  re-rotated to the request's **true positions** (one batched copy + re-rotation call per request);
* the recompute positions are chosen **for this request alone**: ``sink:k`` statically, ``deviation:r`` by a probe
  of the check layer in this request's own context (all pic requests of a batch share one probe forward, but each
  pays for its own probe tokens);
* the chosen positions and the text between segments are recomputed by the same batched pre-pass as tokendance.

So pic keeps a dense private copy of every shared block per agent (about N x S slots for N agents and a block of S
tokens) and pays the selection once per agent, where tokendance keeps one master per segment and round plus small
per-agent diffs and pays the selection once per segment. Everything else (segment tables, registration of outputs,
the radix prefix, eviction, stats) is the collective tree's.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from tokendance_sgl.collective_tree import CollectiveTree
from tokendance_sgl.collector import KVCollector
from tokendance_sgl.diff_alloc import NewRun, coalesce
from tokendance_sgl.host import to_device
from tokendance_sgl.request_state import RowLayout, RowPlan, SelectItem
from tokendance_sgl.reuse import Composed, build_row, lead_end, note_layout_stats

__all__ = ["PicCache", "build_pic_row"]


class _PerRequest(KVCollector):
    """No collective step: no canonical bases, no shared copies; selections are per request."""

    collective = False


class PicCache(CollectiveTree):
    collector_class = _PerRequest

    def build_row(self, req: Any, layout: RowLayout) -> Optional[Composed]:
        return build_pic_row(self, req, layout)


def build_pic_row(tree: CollectiveTree, req: Any, layout: RowLayout) -> Optional[Composed]:
    """Rows ``[layout.start, layout.end)`` of ``req`` as private slots holding the segments' KV re-rotated to their true
    positions; returns the slots, the row plan and the (unshifted) position map, or None when the pool has no room."""
    policy = layout.policy
    if not policy.reuses_masters:
        return build_row(tree, req, layout)  # `full`: exact prefill, as in tokendance
    segs = [tree.store.get(planned.key) for _, _, planned in layout.spans]
    pinned = []
    try:
        for seg in segs:  # the allocation below may evict
            tree.store.lock(seg)
            pinned.append(seg)
        built = tree.compose_row(req, layout.start, [NewRun(layout.end - layout.start)], agent=layout.agent)
        if built is None:
            return None
        slots = built.slots
        src, dst, delta, compute, select = [], [], [], [], []
        pos, recomputed = layout.start, 0
        for (a, b, _), seg in zip(layout.spans, segs):
            if a > pos:
                compute.append((pos, a))
            src.append(seg.master[: b - a])
            dst.append(slots[a - layout.start : b - layout.start])
            delta.append(np.full(b - a, layout.prefix_positions.position_of(a) - seg.anchor, dtype=np.int64))
            offsets = policy.offsets(b - a)
            compute.extend((a + int(o), a + int(o) + 1) for o in offsets)
            if policy.needs_scores:
                select.append(SelectItem(a, b - a, policy, None, offsets))
            recomputed += len(offsets)
            pos = b
        if layout.end > pos:  # text after the last span, up to the region's page boundary
            compute.append((pos, layout.end))
        dst_t = torch.cat(dst).to(torch.int64)
        tree.rerotate_into(torch.cat(src), dst_t, to_device(np.concatenate(delta), dst_t.device))
        tree.store.counters["rotated_tokens"] += int(dst_t.numel())
    finally:
        tree.store.unlock_all(pinned)
    plan = RowPlan(compute_spans=coalesce(compute), select=select, probe_start=layout.start, private_copies=True,
                   lead_end=lead_end(layout))
    note_layout_stats(layout, plan, recomputed, built.private_tokens)
    return slots, plan, layout.prefix_positions
