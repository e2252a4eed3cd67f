"""Segment reuse for one request: the aligned row layout, masters at canonical positions, and the composed row.

The cache calls two functions, in SGLang's load-back protocol:

* :func:`plan_layout` (from ``match_prefix``; cheap, allocates nothing): after the radix prefix ``[0, r)``, which rows
  ``[r, end)`` the request can take as "cached" -- the span from the radix prefix to the end of the last resident
  segment of its plan. ``end - r`` is reported as ``MatchResult.host_hit_length``, so SGLang's ``PrefillAdder``
  budgets those tokens before anything is allocated.
* :func:`build_row` (from ``init_load_back``, after the budget check): takes the round's canonical base from the
  :class:`~tokendance_sgl.collector.KVCollector`, finds (or makes) each segment's master at its canonical position
  (one re-rotated copy per segment and base, shared by every agent using that base; normally made already by the
  collective step), and composes the row through the diff allocator: master slots where the KV is reused,
  private diff slots for the recomputed tokens, private slots for the text between segments. It leaves a
  :class:`~tokendance_sgl.recompute.RowPlan` on the request: which rows the pre-pass computes, the position gap,
  and the ``deviation`` selections still to resolve (once per master and round, before the pre-pass).

Aligned layout: in a round the shared region (from the first segment on) gets the same position ids in every agent's
row: the canonical base ``B >= s0`` (chosen per round from the agents present, see :mod:`tokendance_sgl.collector`).
Rows ``>= s0`` run at position ``row + (B - s0)``, in the pre-pass, the extend and decode. Policy ``full`` uses no master and no gap: every row of ``[r, end)`` is recomputed at its true position
(exact prefill through the same machinery).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Optional

import torch

from tokendance_sgl.diff_alloc import MasterRun, NewRun, coalesce
from tokendance_sgl.recompute import RowPlan, SelectItem
from tokendance_sgl.selection import RecomputePolicy, parse_policy

if TYPE_CHECKING:
    from tokendance_sgl.collective_tree import CollectiveTree, PlannedSegment

__all__ = ["RowLayout", "plan_layout", "build_row", "request_policy"]


@dataclass
class RowLayout:
    start: int  # first composed row (the radix prefix length)
    end: int  # rows [start, end) are taken as cached; the extend starts here
    policy: RecomputePolicy
    spans: list  # [(a, b, PlannedSegment)]: rows [a, b) read the segment's master (b - a <= kv_len)
    base_key: Hashable
    agent: Optional[int] = None
    stats: dict = field(default_factory=dict)

    @property
    def region_start(self) -> int:
        return self.spans[0][0]


def request_policy(tree: "CollectiveTree", req: Any) -> RecomputePolicy:
    """The request's ``custom_params["td_recompute"]`` or the server's policy. A bad value falls back to the server's
    (the request-receipt validation refuses it with HTTP 400 before it gets here)."""
    cp = getattr(req.sampling_params, "custom_params", None) or {}
    spec = cp.get("td_recompute") if isinstance(cp, dict) else None
    if spec is None:
        return tree.policy
    try:
        return parse_policy(spec)
    except ValueError:
        return tree.policy


def plan_layout(tree: "CollectiveTree", req: Any, prefix_len: int, limit: int) -> Optional[RowLayout]:
    """The rows ``[prefix_len, end)`` that segment reuse would cover for ``req`` (None: nothing to reuse)."""
    plan = getattr(req, "td_plan", None)
    if plan is None or not plan.spans:
        return None
    ps = tree.page_size
    spans = []
    last = prefix_len
    for s in sorted(plan.spans, key=lambda s: s.start):
        if s.status != "resident" or s.kv_len <= 0 or s.start < last:
            continue  # evicted / pending / mismatch, inside the radix prefix, or overlapping: recomputed normally
        a, b = s.start, min(s.start + s.kv_len, limit)
        if b <= a:
            break
        node = tree.segment(s.key)
        if node is None or not tree.has_kv(node):
            continue
        spans.append((a, b, s))
        last = s.end
    if ps > 1 and spans:  # the composed region ends on a page boundary: the extend fills the rest
        end = spans[-1][1] // ps * ps
        spans = [(a, min(b, end), s) for a, b, s in spans if a < end]
    if not spans:
        return None
    end = spans[-1][1]
    base_key = (plan.round, plan.ns_key) if plan.round is not None else tuple(s.key for _, _, s in spans)
    return RowLayout(prefix_len, end, request_policy(tree, req), spans, base_key, plan.agent)


def build_row(tree: "CollectiveTree", req: Any, lay: RowLayout) -> Optional[tuple[torch.Tensor, RowPlan]]:
    """Composes ``req``'s rows ``[lay.start, lay.end)``; returns their slots and the row plan, or None when the pool
    cannot provide the slots (nothing is left allocated or locked)."""
    policy = lay.policy
    pinned = []
    select: list[SelectItem] = []
    recomputed = 0  # segment tokens computed in this context (the rest of the pre-pass is text between segments)
    try:
        if not policy.reuses_masters:
            pieces = [NewRun(lay.end - lay.start)]
            compute = [(lay.start, lay.end)]
            gap = gap_start = 0
            exact_len = None
            recomputed = sum(b - a for a, b, _ in lay.spans)
        else:
            s0 = lay.region_start
            base = tree.collector.base_for(lay.base_key, s0)
            gap, gap_start = base - s0, s0
            pieces, compute = [], []
            pos = lay.start
            masters = tree.master_copies([(tree.segment(ps_.key), a + gap) for a, _, ps_ in lay.spans], pinned)
            for (a, b, ps_), seg in zip(lay.spans, masters):
                if seg is None:
                    return None
                if a > pos:
                    pieces.append(NewRun(a - pos))
                    compute.append((pos, a))
                rc = policy.offsets(b - a)
                pieces.append(MasterRun(seg, seg.master[: b - a], recompute=rc))
                compute.extend((a + int(o), a + int(o) + 1) for o in rc)
                if policy.needs_scores:  # the round's shared choice for this segment, whatever base copy a row
                    # reads (offsets within the segment; KVCollector.select)
                    select.append(SelectItem(a, b - a, policy, (lay.base_key, ps_.key, str(policy)), rc))
                recomputed += len(rc)
                pos = b
            exact_len = s0  # rows from here on read approximate KV (or run at shifted positions)
        built = tree.compose_row(req, lay.start, pieces, agent=lay.agent)
        if built is None:
            return None
    finally:
        for seg in pinned:
            tree.unlock_segment(seg)
    spans = coalesce(compute)
    row_plan = RowPlan(compute_spans=spans, gap_start=gap_start, gap=gap, exact_len=exact_len, select=select,
                       probe_start=lay.start)
    n = lay.end - lay.start
    computed = row_plan.compute_tokens
    lay.stats = {"host_tokens": n, "reused": n - computed, "recomputed": recomputed, "text": computed - recomputed,
                 "private_slots": built.private_tokens}
    return built.slots, row_plan
