"""What tokendance keeps about one SGLang request: one typed object, ``req.td``, the only contract between the
scheduler side (the cache, the collector) and the worker side (the pre-pass, the position hook).

Nothing else of ours is set on SGLang's ``Req`` (or ``TreeNode``). :func:`state_of` attaches the object the first
time; :meth:`RequestState.release_row` clears everything that describes the request's row when SGLang releases it
(finish, abort, retraction); a retracted request is planned again from scratch when it is matched again.

Life of a request's state (see ``docs/architecture.md``):

1. ``match_prefix`` -> ``plan`` (the segments its prompt contains), ``match_ns``/``positions`` (the cached path it
   continues and that path's position map), ``layout`` (the rows offered to SGLang as a "host hit");
2. ``init_load_back`` -> ``host_slots`` (the composed region's slots), ``row_plan`` (what the pre-pass computes),
   ``held_pages``/``reads`` (what the live row holds), ``namespace`` and ``positions`` of the row;
3. the forward hooks read ``row_plan`` and ``positions``; ``checkpoint`` inserts the row under ``namespace`` and
   stores ``positions`` with the path; ``on_release`` gives back ``held_pages`` and ``reads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import numpy as np
import torch

from tokendance_sgl.early_match import EarlyMatch
from tokendance_sgl.position_map import EMPTY_RUNS, NO_SHIFT, MasterRuns, PositionMap

__all__ = ["PlannedSegment", "SegmentPlan", "RowLayout", "SelectItem", "RowPlan", "RequestState", "state_of",
           "row_plan_of"]


@dataclass(slots=True)
class PlannedSegment:
    """One span of the prompt that names (or contains) a registered segment."""

    start: int  # row positions [start, end) of the prompt
    end: int
    seg_id: Optional[str]
    key: Optional[str]  # content key of the segment node (None while pending)
    source: str  # "table" | "detected"
    status: str  # "resident" | "evicted" | "pending" | "other-namespace" | "mismatch"
    kv_len: int  # tokens of the span whose master KV is resident now (0: recompute all)
    anchor: Optional[int] = None  # position the master's first token was computed (rotated) for
    node: Any = None  # the segment node, when resident at the plan's store epoch

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class SegmentPlan:
    """The segments a prompt contains (from its segment table, or by detection), planned against the store."""

    round: Optional[int]
    agent: Optional[int]
    out_seg: Optional[str]
    ns_key: str
    source: str  # "table" | "detected" | "none"
    spans: list  # [PlannedSegment], sorted by start (a table's spans are; detection finds them left to right)
    error: Optional[str]
    epoch: int  # the store's epoch when planned (re-planned when the store changed)
    prompt_len: int

    @property
    def reusable_tokens(self) -> int:
        return sum(s.kv_len for s in self.spans)

    @property
    def span_tokens(self) -> int:
        """Prompt tokens inside the spans."""
        return sum(s.end - s.start for s in self.spans)


@dataclass
class RowLayout:
    """The region ``[start, end)`` of a row that segment reuse covers (offered as SGLang's host hit)."""

    start: int  # first composed row (the cached prefix length)
    end: int  # rows [start, end) are taken as cached; the extend starts here
    policy: Any  # tokendance_sgl.selection.RecomputePolicy
    spans: MasterRuns  # (a, b, PlannedSegment): rows [a, b) read the segment's master (b - a <= kv_len)
    base_key: Hashable  # the round the canonical base belongs to
    prefix_positions: PositionMap = NO_SHIFT  # map of the cached prefix [0, start)
    agent: Optional[int] = None
    stats: dict = field(default_factory=dict)

    @property
    def region_start(self) -> int:
        return self.spans.starts[0]


@dataclass(eq=False)
class SelectItem:
    """A reused segment run (rows ``[start, start + n)``) whose recompute positions depend on measured deviation."""

    start: int
    n: int
    policy: Any  # tokendance_sgl.selection.RecomputePolicy
    sel_key: Optional[Hashable]  # shared choice of the round (tokendance); None: chosen for this request (pic)
    static: np.ndarray  # offsets already recomputed (the sink part)


@dataclass
class RowPlan:
    """What the worker computes inside the composed region before the extend (the pre-pass)."""

    compute_spans: list[tuple[int, int]] = field(default_factory=list)
    pending: bool = True  # compute_spans not run yet
    select: list = field(default_factory=list)  # SelectItems still to resolve before the pre-pass
    probe_start: int = 0  # first row a selection probe computes (the end of the cached prefix)
    # rows [probe_start, lead_end): text before the first reused segment, at the prefix's positions; the worker
    # computes them first, as a plain extend through the configured attention backend (0: none)
    lead_end: int = 0
    lead_done: int = 0  # leading rows computed already (taken out of compute_spans, still counted as computed)
    private_copies: bool = False  # every composed row is private (pic): a selection needs no new slots
    tails: list = field(default_factory=list)  # (copy, row): copies whose pending last token this row computes

    def __post_init__(self) -> None:
        if self.lead_end and not (self.compute_spans and self.compute_spans[0][0] == self.probe_start
                                  and self.compute_spans[0][1] >= self.lead_end):
            raise ValueError(f"the leading rows [{self.probe_start}, {self.lead_end}) must open the compute spans")
        prev = -1
        for s, e in self.compute_spans:
            if not (0 <= s < e) or s < prev:
                raise ValueError(f"compute spans must be sorted, disjoint and non-empty: {self.compute_spans}")
            prev = e

    @property
    def compute_tokens(self) -> int:
        return sum(e - s for s, e in self.compute_spans) + self.lead_done

    def take_lead(self) -> Optional[tuple[int, int]]:
        """The leading rows (None: none), now taken out of the spans left to compute; a probe starts after them."""
        a, b = self.probe_start, self.lead_end
        if b <= a:
            return None
        self.compute_spans = [(max(s, b), e) for s, e in self.compute_spans if e > b]
        self.probe_start, self.lead_end, self.lead_done = b, 0, b - a
        return a, b


@dataclass
class RequestState:
    """Everything tokendance knows about one request (``req.td``), field by field."""

    # the segments its prompt contains (planning.plan_for), re-planned when the segment store changes
    plan: Optional[SegmentPlan] = None
    # the namespace of the cached path its prefix was matched in (None: the exact, default namespace)
    match_ns: Optional[str] = None
    # the region reuse would compose now (match_prefix); consumed by init_load_back
    layout: Optional[RowLayout] = None
    # row -> position map of the row: the matched path's, plus the gap of the region composed for it
    positions: PositionMap = NO_SHIFT
    # (first row, end row, segment): rows of the matched path that reference a segment's master pages
    path_runs: MasterRuns = EMPTY_RUNS
    # the namespace its row is inserted under at checkpoint (None: exact KV at true positions)
    namespace: Optional[str] = None
    # slots of the composed region, in row order (prefix_device_indices appends them to the cached prefix)
    host_slots: Optional[torch.Tensor] = None
    # the pre-pass work of the composed region (worker side)
    row_plan: Optional[RowPlan] = None
    # pages the live row holds in the ledger (the fresh pages of its composed region; `reads` covers the masters)
    held_pages: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # segments the live row reads (each locked once for the row's life)
    reads: list = field(default_factory=list)
    # agent id (segment table), for the per-agent KV accounting
    agent: Optional[int] = None
    # content key of the segment its output was registered as
    registered: Optional[str] = None
    # the last segment-table warning logged for it (logged once)
    warned: Optional[str] = None
    # a collective step has planned it (KVCollector.collect plans each waiting request once)
    collected: bool = False
    # its segment table as parsed once: (prompt length, table or None, SegmentTableError or None)
    table: Optional[tuple] = None
    # the prefix match the collective step made while it waited (taken at admission while it holds)
    early: Optional[EarlyMatch] = None
    # the row its prefill was cut at so that SGLang's chunked prefill computes its lead; its region is composed when
    # the chunk reaches it (tokendance_sgl.lead_chunk; 0: none)
    lead_cut: int = 0

    @property
    def composed(self) -> bool:
        return self.host_slots is not None

    def master_runs(self, rec: Any) -> MasterRuns:
        """Every run of the row that references a master: the matched path's and those of ``rec`` (the row's diff
        record, None: nothing composed), as ``(first row, end row, segment)``, sorted and disjoint (the region
        composed for the row starts where its matched path ends)."""
        return MasterRuns.concat((self.path_runs, rec.runs())) if rec is not None else self.path_runs

    def release_row(self) -> None:
        """Forgets the row (SGLang released it); the caller has given back ``held_pages`` and ``reads``."""
        self.layout = None
        self.host_slots = None
        self.row_plan = None
        self.held_pages = np.empty(0, dtype=np.int64)
        self.reads = []
        self.positions = NO_SHIFT
        self.path_runs = EMPTY_RUNS
        self.namespace = None
        self.match_ns = None
        self.early = None
        self.lead_cut = 0


def state_of(req: Any) -> RequestState:
    """The request's state, attached on first use."""
    st = getattr(req, "td", None)
    if st is None:
        st = RequestState()
        req.td = st
    return st


def row_plan_of(req: Any) -> Optional[RowPlan]:
    st = getattr(req, "td", None)
    return None if st is None else st.row_plan
