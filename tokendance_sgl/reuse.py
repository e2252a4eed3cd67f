"""Segment reuse for one request: the aligned row layout, masters at canonical positions, and the composed row.

The cache calls two functions, in SGLang's load-back protocol:

* :func:`plan_layout` (from ``match_prefix``; cheap, allocates nothing): after the cached prefix ``[0, r)``, which
  rows ``[r, end)`` the request can take as "cached" -- the span from the prefix to the end of the last resident
  segment of its plan. ``end - r`` is reported as ``MatchResult.host_hit_length``, so SGLang's ``PrefillAdder``
  budgets those tokens before anything is allocated.
* :func:`build_row` (from ``init_load_back``, after the budget check): takes the round's canonical base
  (:mod:`tokendance_sgl.bases`), finds (or makes) each segment's master at its canonical position (one re-rotated
  copy per segment and base, shared by every agent using that base; normally made already by the collective step),
  and composes the region through the diff allocator: master slots where the KV is reused, private diff slots for
  the recomputed tokens, private slots for the text between segments. It returns the slots, the
  :class:`~tokendance_sgl.request_state.RowPlan` (which rows the pre-pass computes, the ``deviation`` selections to
  resolve once per master and round) and the row's position map. The agents of a round at one base read the same
  copies at the same offsets: the first plans the region once (:class:`RegionTemplate`: copies, pieces, compute
  spans, the diff allocator's :class:`~tokendance_sgl.row_shape.RowShape`), the others get it stamped at their rows
  (fresh slots, their own claims), after checking that every copy it reads is still resident.

Aligned layout: in a round the shared region gets the same position ids in every agent's row: the canonical base
``B >= p0`` where ``p0`` is the position the region would start at (its row plus the shift the cached prefix already
carries). Rows from the region on run at ``row + shift + (B - p0)``, in the pre-pass, the extend, decode, and every
later request that continues the row from the tree. The total shift of a row is bounded by ``max_drift`` and by the
model's context length (a region that would pass either gets a base of its own, with no gap). Policy ``full`` uses
no master and no gap: every row of ``[r, end)`` is recomputed at its true position (exact prefill through the same
machinery).

The functions talk to the cache through :class:`ReuseHost` (the parts they need), not the cache class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch

from tokendance_sgl.bases import CanonicalBases, remember
from tokendance_sgl.config import TreeConfig
from tokendance_sgl.diff_alloc import BuiltRow
from tokendance_sgl.row_shape import MasterRun, NewRun, RowShape, coalesce
from tokendance_sgl.position_map import NO_SHIFT, MasterRuns, PositionMap
from tokendance_sgl.request_state import RowLayout, RowPlan, SelectItem, state_of
from tokendance_sgl.segment_store import SegmentStore
from tokendance_sgl.selection import RecomputePolicy, parse_policy

__all__ = ["prepass_tokens", "lead_end", "ReuseHost", "plan_layout", "build_row", "request_policy", "gap_budget", "release_tails", "Composed"]

Composed = tuple[torch.Tensor, RowPlan, PositionMap]  # region slots, pre-pass plan, the row's position map


class ReuseHost(Protocol):
    """What reuse and the collector need from the cache (the collective tree provides it)."""

    config: TreeConfig
    policy: RecomputePolicy
    store: SegmentStore
    bases: CanonicalBases
    collector: Any  # its ``collective`` flag: masters shared by a round (tokendance) or per request (pic)
    page_size: int
    context_len: int
    templates: Any  # OrderedDict: template key -> RegionTemplate (bounded, cleared with the cache)
    stats: Any  # its ``counters``

    def compose_row(self, req: Any, start_pos: int, pieces: list | RowShape, *, agent: Optional[int] = None
                    ) -> Optional[BuiltRow]: ...

    def rerotate_into(self, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None: ...


def request_policy(host: ReuseHost, req: Any) -> RecomputePolicy:
    """The request's ``custom_params["td_recompute"]`` or the server's policy. A bad value falls back to the server's
    (the request-receipt validation refuses it with HTTP 400 before it gets here)."""
    cp = getattr(req.sampling_params, "custom_params", None) or {}
    spec = cp.get("td_recompute") if isinstance(cp, dict) else None
    if spec is None:
        return host.policy
    try:
        return parse_policy(spec)
    except ValueError:
        return host.policy


def plan_layout(host: ReuseHost, req: Any, prefix_len: int, limit: int,
                prefix_positions: Optional[PositionMap] = None) -> Optional[RowLayout]:
    """The rows ``[prefix_len, end)`` that segment reuse would cover for ``req`` (None: nothing to reuse)."""
    plan = state_of(req).plan
    if plan is None or not plan.spans:
        return None
    policy = request_policy(host, req)
    # a round's copies carry the segment's last token (computed once per copy): the region covers it
    complete = policy.reuses_masters and host.collector.collective
    page_size = host.page_size
    starts, ends, used = [], [], []
    last = prefix_len
    store = host.store
    current = plan.epoch == store.epoch  # no segment dropped since planning: its resident nodes are the store's
    for s in plan.spans:  # sorted by start
        if s.status != "resident" or s.kv_len <= 0 or s.start < last:
            continue  # evicted / pending / mismatch, inside the cached prefix, or overlapping: recomputed normally
        node = s.node if current else store.get(s.key)
        if node is None or not store.has_kv(node):
            continue
        a = s.start
        b = min(a + (s.end - a if complete else s.kv_len), limit)
        if b <= a:
            break
        starts.append(a)
        ends.append(b)
        used.append(s)
        last = s.end
    if not used:
        return None
    spans = MasterRuns(tuple(starts), tuple(ends), tuple(used))
    end = ends[-1]
    if page_size > 1:  # the region ends on a page boundary (SGLang's extend continues the last page of the prefix):
        end = end // page_size * page_size  # the spans are cut there; text between the last one and it is computed
        spans = spans.window(0, end)
        if not spans.starts:
            return None
    base_key = (plan.round, plan.ns_key) if plan.round is not None else tuple(s.key for s in spans.segs)
    return RowLayout(prefix_len, end, policy, spans, base_key, prefix_positions or NO_SHIFT, plan.agent)


def gap_budget(host: ReuseHost, req: Any, pmap: PositionMap) -> int:
    """The largest gap a new region of ``req`` may add: the drift left under ``max_drift`` and the positions left
    under the model's context length after the prompt and its longest output."""
    max_new = getattr(req.sampling_params, "max_new_tokens", None) or 0
    room = host.context_len - (len(req.origin_input_ids) + int(max_new)) - pmap.total
    return max(0, min(host.config.max_drift - pmap.total, room))


@dataclass(eq=False)
class RegionTemplate:
    """A region composed from masters, in rows relative to its first row: what every row of a round that reads the
    same copies at the same offsets shares (the agents at one canonical base). Planned by the first such row, stamped
    for the others (:func:`_stamp`)."""

    masters: tuple  # the node (segment or re-rotated copy) each span reads
    pieces: list  # the composition (diff allocator pieces)
    spans: list  # rows the pre-pass computes (coalesced; without the copies' last tokens)
    select: list  # (row, n, selection key, static offsets) of every deviation selection
    tails: list  # (copy, row): a copy's last token, computed by the first row that reads it while it is pending
    recomputed: int  # recomputed positions among the reused tokens
    shape: Optional[RowShape] = None  # the diff allocator's plan, set by the first composition
    checked: tuple = ()  # (store epoch, round) of its last full check, when every node it reads is strong


def _template_key(layout: RowLayout, positions: PositionMap) -> tuple:
    """Rows whose regions agree on this read the same copies at the same offsets: a span at row ``a >= region
    start`` reads the copy rotated for position ``a + positions.total``."""
    start = layout.start
    return (layout.policy, layout.base_key, start + positions.total, layout.end - start,
            tuple((a - start, b - start, planned.key) for a, b, planned in layout.spans))


def _still_valid(store: SegmentStore, tmpl: RegionTemplate) -> bool:
    """Whether every node the template reads is still the store's, with valid KV (copies then count as used now). A
    strong node keeps its KV until it is dropped, and a drop steps the store's epoch: a template of strong nodes
    checked at this epoch and round holds without a look."""
    if tmpl.checked == (store.epoch, store.current_round):
        return True
    if not all(store.get(m.key) is m and store.has_kv(m) for m in tmpl.masters):
        return False
    for m in tmpl.masters:
        if m.copy_of is not None:
            m.round = max(m.round, store.current_round)  # as a lookup by master_copies would
    if all(m.strong for m in tmpl.masters):
        tmpl.checked = (store.epoch, store.current_round)
    return True


def _new_template(host: ReuseHost, layout: RowLayout, positions: PositionMap, pinned: list
                  ) -> Optional[RegionTemplate]:
    """Plans the region of ``layout`` (its copies made now if missing, pinned into ``pinned``); None when a segment
    has no KV or the pool has no room for a copy."""
    policy, store, start = layout.policy, host.store, layout.start
    masters = store.master_copies(
        [(store.get(planned.key), positions.position_of(a), a) for a, _, planned in layout.spans], pinned)
    if any(m is None for m in masters):
        return None
    pieces, compute, points, select, tails, recomputed, pos = [], [], [], [], [], 0, start
    for (a, b, planned), seg in zip(layout.spans, masters):
        if a > pos:
            pieces.append(NewRun(a - pos))
            compute.append((pos - start, a - start))
        n = min(b - a, seg.kv_len)  # master tokens (the segment itself lacks its last token: computed as text)
        offsets = policy.offsets(n)
        offsets.flags.writeable = False  # shared by the rows stamped from the template
        pieces.append(MasterRun(seg, seg.master[:n], recompute=offsets, host=seg.host[:n]))
        points.append(a - start + offsets)  # recomputed positions
        if n == len(seg.tokens) and (offsets.size == 0 or offsets[-1] != n - 1):  # (offsets are sorted)
            tails.append((seg, a - start + n - 1))
        if n < b - a:
            pieces.append(NewRun(b - a - n))
            compute.append((a + n - start, b - start))
        if policy.needs_scores:  # the round's shared choice for this segment, whatever base copy a row reads
            select.append((a - start, n, (layout.base_key, planned.key, str(policy)), offsets))
        recomputed += len(offsets)
        pos = b
    if layout.end > pos:  # text after the last span, up to the region's page boundary
        pieces.append(NewRun(layout.end - pos))
        compute.append((pos - start, layout.end - start))
    return RegionTemplate(tuple(masters), pieces, coalesce(compute, np.concatenate(points) if points else None),
                          select, tails, recomputed)


def _stamp(tmpl: RegionTemplate, req: Any, layout: RowLayout) -> tuple[list, list, list]:
    """The compute spans, selections and claimed tails of one row composed from ``tmpl``: this row computes the last
    token of every copy whose token is still pending and unclaimed."""
    start, tails, extra = layout.start, [], []
    for seg, row in tmpl.tails:
        if seg.tail_pending and seg.tail_writer is None:
            seg.tail_writer = id(req.kv)  # this row computes the copy's last token, into the copy, for the round
            tails.append((seg, start + row))
            extra.append((row, row + 1))
    spans = coalesce(tmpl.spans + extra) if extra else tmpl.spans
    select = [SelectItem(start + row, n, layout.policy, key, offsets) for row, n, key, offsets in tmpl.select]
    return [(a + start, b + start) for a, b in spans], select, tails


def _build_region(host: ReuseHost, req: Any, layout: RowLayout, pinned: list):
    """The template, compute spans, selections, claimed tails and position map of an approximate (master-reading)
    region; None when it cannot be composed now."""
    s0 = layout.region_start
    p0 = layout.prefix_positions.position_of(s0)
    base = host.bases.base_for(layout.base_key, p0, gap_budget(host, req, layout.prefix_positions))
    positions = layout.prefix_positions.with_gap(s0, base - p0)
    key = _template_key(layout, positions)
    tmpl = host.templates.get(key)
    if tmpl is not None and _still_valid(host.store, tmpl):
        host.stats.counters["compositions_shared"] += 1
    else:
        tmpl = _new_template(host, layout, positions, pinned)
        if tmpl is None:
            return None
        remember(host.templates, key, tmpl)
    compute, select, tails = _stamp(tmpl, req, layout)
    return tmpl, compute, select, tails, positions


def build_row(host: ReuseHost, req: Any, layout: RowLayout) -> Optional[Composed]:
    """Composes ``req``'s rows ``[layout.start, layout.end)``; returns their slots, the row plan and the row's position
    map, or None when the pool cannot provide the slots (nothing is left allocated or locked)."""
    pinned: list = []
    tails: list = []
    built = None
    try:
        tmpl = None
        if not layout.policy.reuses_masters:
            pieces, compute, select = [NewRun(layout.end - layout.start)], coalesce([(layout.start, layout.end)]), []
            recomputed, positions = sum(b - a for a, b, _ in layout.spans), layout.prefix_positions
        else:
            got = _build_region(host, req, layout, pinned)
            if got is None:
                return None
            tmpl, compute, select, tails, positions = got
            pieces, recomputed = tmpl.shape or tmpl.pieces, tmpl.recomputed
        built = host.compose_row(req, layout.start, pieces, agent=layout.agent)
        if built is None:
            return None
        if tmpl is not None and tmpl.shape is None:
            tmpl.shape = built.shape
        if tails and built.private_positions.size:  # copied on write (pages): its last token is this row's own
            own = set((layout.start + built.private_positions).tolist())
            release_tails([t for t in tails if t[1] in own])
            tails = [t for t in tails if t[1] not in own]
    finally:
        host.store.unlock_all(pinned)
        if built is None:
            release_tails(tails)
    row_plan = RowPlan(compute_spans=compute, select=select, probe_start=layout.start, tails=tails,
                       lead_end=lead_end(layout))
    note_layout_stats(layout, row_plan, recomputed, built.private_tokens)
    return built.slots, row_plan, positions


def lead_end(layout: RowLayout) -> int:
    """The end of the region's rows at the cached prefix's own positions that precede every reused KV (text before
    the first segment; the whole region when the policy reuses nothing): they are computed as a plain extend."""
    end = layout.region_start if layout.policy.reuses_masters else layout.end
    return end if end > layout.start else 0


def prepass_tokens(layout: RowLayout) -> int:
    """At most what the pre-pass computes for ``layout`` (before it is composed): the text between its segments, each
    segment's recompute budget, the tokens past a segment's KV and the copy's last token."""
    policy = layout.policy
    if not policy.reuses_masters:
        return layout.end - layout.start
    total, pos = 0, layout.start
    for a, b, planned in layout.spans:
        n = min(b - a, planned.kv_len)
        total += (a - pos) + policy.budget(n) + (b - a - n) + 1
        pos = b
    return min(total + layout.end - pos, layout.end - layout.start)


def release_tails(tails: list) -> None:
    """A row that claimed copies' last tokens will not compute them: the next row that reads them does."""
    for seg, _row in tails:
        seg.tail_writer = None


def note_layout_stats(layout: RowLayout, row_plan: RowPlan, recomputed: int, private_slots: int) -> None:
    n = layout.end - layout.start
    computed = row_plan.compute_tokens
    layout.stats = {"host_tokens": n, "reused": n - computed, "recomputed": recomputed, "text": computed - recomputed,
                 "private_slots": private_slots}
