"""Diff allocator: composes a request's reused region from shared master slots and its own diff slots.

A composed region is a sequence of pieces (:mod:`tokendance_sgl.row_shape`: :class:`MasterRun`, master slots
minus the offsets recomputed for this row; :class:`NewRun`, fresh slots for text the pre-pass computes), planned
once into a :class:`RowShape`. :meth:`DiffAllocator.build_row` returns the region's slots and records, per row, the
**master references**: half-open row-position intervals whose slots are a segment's. Every other slot of the region
is the row's own (**diff** slots of recomputed tokens, slots of new tokens). The cache makes the live row a holder of
those fresh pages in the page ledger (:mod:`tokendance_sgl.ledger`) and locks the segments whose masters it reads,
so who frees a slot is decided there, not here.

Page granularity (``page_size > 1``): a row page -- row positions ``[k*page_size, (k+1)*page_size)``, which
always map onto one pool page -- is either entirely a master page (all its positions reference the same master page
at matching offsets) or entirely the row's own. A row page that would mix master tokens with private tokens (a
recomputed token, a new token, tokens of another master page or a misaligned master run) is **copied on write as a
whole page**: a fresh page is allocated, the master tokens that are reused are copied into it through
``copy_fn(src, dst)`` and the private tokens get the page's other slots.

:meth:`DiffAllocator.privatize` turns master positions of a built row into the row's own (a ``deviation`` choice
made after composition). Per-agent accounting (:meth:`row_kv_tokens`): a row's master slots weighted by
``1/refcount`` (``refcount``: the live rows referencing that slot) plus its private slots. Each record keeps its
distinct master slots (a row of a shared plan takes the plan's, no work); the refcounts are counted from them when
asked (one pass over the live rows' master slots, for the stats), so composing and releasing a row never touch them.

This module imports no sglang: unit tests drive it with a real SGLang allocator or a fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import numpy as np
import torch

from tokendance_sgl.distinct import Distinct
from tokendance_sgl.host import to_device, to_host
from tokendance_sgl.position_map import MasterRuns
from tokendance_sgl.row_shape import MasterRun, NewRun, Piece, RowShape, coalesce, plan_shape, seg_id
from tokendance_sgl.slot_mirror import kv_device_of

__all__ = [
    "NewRun",
    "MasterRun",
    "MasterRef",
    "RowRecord",
    "BuiltRow",
    "RowShape",
    "DiffAllocator",
    "coalesce",
]


@dataclass
class MasterRef:
    """Row positions ``[start, end)`` hold ``slots`` (master slots of ``seg``): not the request's to free."""

    start: int
    end: int
    seg: Hashable
    slots: np.ndarray  # host int64, len == end - start

    def __len__(self) -> int:
        return self.end - self.start


def _shape_refs(start: int, shape: RowShape) -> list[MasterRef]:
    """The master references of ``shape``'s kept runs at row ``start`` (views of its read-only slots)."""
    return [MasterRef(start + a, start + b, shape.pieces[i].seg, shape.src[a:b]) for a, b, i in shape.runs]


@dataclass(eq=False)
class RowRecord:
    """A live row's master references and private slots. A row composed from a shared plan keeps the plan and its
    start until its references are asked for (:attr:`refs`): composing a row costs no reference objects."""

    key: Hashable
    agent: Optional[int] = None
    private_tokens: int = 0  # slots of the composed region that are the row's own (diffs, new tokens)
    end: int = 0  # first row position after the composed region
    owner: Any = None  # keeps the keyed object alive (ids are only unique among live objects)
    distinct: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # its distinct master slots
    # (read-only: rows of one plan share the array)
    _refs: Optional[list] = field(default=None, repr=False)
    _planned: Optional[tuple] = field(default=None, repr=False)  # (start, shape) of refs not built yet
    _runs: Optional[MasterRuns] = field(default=None, repr=False)  # (start, end, seg) per reference, once asked

    @property
    def refs(self) -> list[MasterRef]:
        """The row's master references, sorted by start and disjoint."""
        if self._refs is None:
            self._refs = _shape_refs(*self._planned) if self._planned is not None else []
        return self._refs

    @refs.setter
    def refs(self, refs: list) -> None:
        self._refs, self._planned, self._runs = refs, None, None

    def plan_refs(self, start: int, shape: Any) -> None:
        """The references are the kept runs of ``shape`` at row ``start`` (built when first asked for)."""
        self._refs, self._planned, self._runs = None, (start, shape), None

    def runs(self) -> MasterRuns:
        """``(start, end, segment)`` of every master reference."""
        if self._runs is None:
            if self._refs is None and self._planned is not None:
                start, shape = self._planned
                self._runs = shape.master_runs.shifted(start)
            else:
                refs = self.refs
                self._runs = MasterRuns(tuple(r.start for r in refs), tuple(r.end for r in refs),
                                        tuple(r.seg for r in refs))
        return self._runs

    def segs(self) -> list:
        if self._refs is None and self._planned is not None:
            return list(self._planned[1].segs)
        seen: dict = {}
        for r in self.refs:
            seen.setdefault(seg_id(r.seg), r.seg)
        return list(seen.values())

    def master_positions(self) -> np.ndarray:
        if not self.refs:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.arange(r.start, r.end, dtype=np.int64) for r in self.refs])


@dataclass
class BuiltRow:
    slots: torch.Tensor  # slot per row position of the built span, on the allocator's device
    segs: list  # distinct segments the span references (the caller locks them once each)
    private_tokens: int  # slots allocated for the span (whole pages when page_size > 1)
    private_positions: np.ndarray  # offsets (within the span) of the positions with private slots (read-only)
    copies: int  # master tokens copied into copy-on-write pages
    copied_pages: int = 0  # copy-on-write pages (pages that received master tokens)
    host: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # ``slots`` on the host, as composed
    shape: Optional[RowShape] = None  # the plan it was built from (reusable for rows of the same pieces)


def _distinct_slots(rec: RowRecord, distinct: Optional[Distinct] = None) -> np.ndarray:
    """The row's distinct master slots: sorted, or (with a ``distinct`` scratch, O(n)) in no particular order."""
    if not rec.refs:
        return np.empty(0, dtype=np.int64)
    slots = np.concatenate([r.slots for r in rec.refs])
    return distinct.of(slots) if distinct is not None else np.unique(slots)


def _host_i64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return to_host(t, torch.int64).copy()
    return np.asarray(list(t), dtype=np.int64)


class DiffAllocator:
    """Per-row master/owned bookkeeping and copy-on-write row composition over an SGLang KV allocator.

    ``allocator`` provides ``alloc(n)``/``free(idx)`` (SGLang's ``TokenToKVPoolAllocator`` or
    ``PagedTokenToKVPoolAllocator``) and ``page_size``. ``alloc_fn(n)`` overrides allocation (the cache passes one
    that evicts first). ``copy_fn(src, dst)`` copies K/V of pool slots (needed for copy-on-write pages when
    ``page_size > 1``). ``bytes_per_token`` is the K+V bytes of one token over all layers.
    """

    def __init__(
        self,
        allocator: Any,
        *,
        page_size: Optional[int] = None,
        bytes_per_token: float = 0.0,
        copy_fn: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
        alloc_fn: Optional[Callable[[int], Optional[torch.Tensor]]] = None,
    ):
        self.allocator = allocator
        self.page_size = int(page_size if page_size is not None else getattr(allocator, "page_size", 1))
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.bytes_per_token = float(bytes_per_token)
        self.copy_fn = copy_fn
        self.alloc_fn = alloc_fn
        self.rows: dict[Hashable, RowRecord] = {}
        self._distinct = Distinct()  # scratch of a row's distinct master slots

    @property
    def device(self) -> Any:
        """Where the KV (and the slot tensors) live (:func:`~tokendance_sgl.slot_mirror.kv_device_of`)."""
        return kv_device_of(self.allocator)

    # ------------------------------------------------------------------ records

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def record(self, key: Hashable) -> Optional[RowRecord]:
        return self.rows.get(key)

    def ensure_record(self, key: Hashable, *, agent: Optional[int] = None, owner: Any = None) -> RowRecord:
        rec = self.rows.get(key)
        if rec is None:
            rec = RowRecord(key=key, agent=agent, owner=owner)
            self.rows[key] = rec
        else:
            if agent is not None:
                rec.agent = agent
            if owner is not None:
                rec.owner = owner
        return rec

    def pop_row(self, key: Hashable) -> Optional[RowRecord]:
        """Forgets the row; returns its record."""
        return self.rows.pop(key, None)

    def clear(self) -> None:
        self.rows.clear()

    def _recount(self, rec: RowRecord, now: Optional[np.ndarray] = None) -> None:
        """The row's references changed: its distinct master slots are ``now`` (when the caller knows them) or
        recomputed."""
        rec.distinct = _distinct_slots(rec, self._distinct) if now is None else now

    def add_master_ref(
        self, key: Hashable, start: int, end: int, seg: Hashable, slots, *, agent=None, owner=None
    ) -> MasterRef:
        """Marks row positions ``[start, end)`` (holding ``slots``) as belonging to ``seg``."""
        ref = self._append_ref(self.ensure_record(key, agent=agent, owner=owner), start, end, seg, slots)
        self._recount(self.rows[key])
        return ref

    def _append_ref(self, rec: RowRecord, start: int, end: int, seg: Hashable, slots) -> MasterRef:
        slots = _host_i64(slots)
        if end - start != slots.size:
            raise ValueError(f"master ref [{start}, {end}) needs {end - start} slots, got {slots.size}")
        if end <= start:
            raise ValueError("empty master ref")
        ref = MasterRef(int(start), int(end), seg, slots)
        self._merge_refs(rec, [ref])
        return ref

    @staticmethod
    def _merge_refs(rec: RowRecord, new: list) -> None:
        """Adds non-empty, mutually disjoint ``new`` refs (sorted by start) to the record; refuses an overlap."""
        refs = sorted(rec.refs + new, key=lambda r: r.start) if rec.refs else new
        for a, b in zip(refs, refs[1:]):
            if b.start < a.end:
                raise ValueError(f"master ref [{b.start}, {b.end}) overlaps [{a.start}, {a.end}) of row {rec.key!r}")
        rec.refs = refs

    def privatize(self, key: Hashable, positions: Sequence[int], fresh: torch.Tensor) -> list:
        """Row positions that read a master become the row's own: ``fresh`` (one new slot per position, same order)
        replaces the master slot there; the caller writes it into the row (and, with pages, copies the master's KV
        into it). With ``page_size > 1`` the positions must be whole row pages (:meth:`master_pages_of`). Returns
        the segments the row no longer references at all."""
        ps = self.page_size
        pos = np.unique(np.asarray(positions, dtype=np.int64))
        if pos.size != len(positions) or int(fresh.numel()) != pos.size:
            raise ValueError("privatize needs distinct positions and one fresh slot per position")
        if ps > 1:
            blocks = pos.reshape(-1, ps) if pos.size % ps == 0 else None
            if blocks is None or (blocks[:, 0] % ps).any() or not (blocks == blocks[:, :1] + np.arange(ps)).all():
                raise ValueError("privatize with pages needs whole row pages")
        rec = self.rows.get(key)
        if rec is None:
            raise ValueError(f"row {key!r} has no master references")
        before = {seg_id(s): s for s in rec.segs()}
        kept: list[MasterRef] = []
        hit = 0
        for r in rec.refs:
            inside = pos[(pos >= r.start) & (pos < r.end)]
            hit += inside.size
            if inside.size == 0:
                kept.append(r)
                continue
            cuts = np.concatenate([[r.start - 1], inside, [r.end]])
            for a, b in zip((cuts[:-1] + 1).tolist(), cuts[1:].tolist()):
                if b > a:
                    kept.append(MasterRef(a, b, r.seg, r.slots[a - r.start : b - r.start]))
        if hit != pos.size:
            raise ValueError(f"privatize: {pos.size - hit} of the positions are not master references of row {key!r}")
        rec.refs = kept
        self._recount(rec)
        rec.private_tokens += int(pos.size)
        after = {seg_id(s) for s in rec.segs()}
        return [s for k, s in before.items() if k not in after]

    def private_tokens(self) -> int:
        """Private (diff and new) slots of every live row."""
        return int(sum(r.private_tokens for r in self.rows.values()))

    def master_pages_of(self, key: Hashable, positions: np.ndarray) -> np.ndarray:
        """``positions`` of row ``key`` that read a master (the others are the row's own already), widened to whole
        row pages (a kept master page always is one: :meth:`build_row`). Sorted."""
        rec = self.rows.get(key)
        pos = np.unique(np.asarray(positions, dtype=np.int64))
        masters = rec.master_positions() if rec is not None else np.empty(0, dtype=np.int64)
        hit = pos[np.isin(pos, masters)]
        if self.page_size == 1:
            return hit
        return masters[np.isin(masters // self.page_size, np.unique(hit // self.page_size))]

    # ------------------------------------------------------------------ composition

    def _alloc(self, n: int) -> Optional[torch.Tensor]:
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        fn = self.alloc_fn or self.allocator.alloc
        out = fn(n)
        if out is None:
            return None
        return out.to(torch.int64)

    def plan(self, pieces: Sequence[Piece]) -> RowShape:
        """The shape of a composition of ``pieces`` (:func:`~tokendance_sgl.row_shape.plan_shape`)."""
        return plan_shape(pieces, self.page_size, self._distinct)

    def build_row(
        self,
        key: Hashable,
        start_pos: int,
        pieces: Union[Sequence[Piece], RowShape],
        *,
        agent: Optional[int] = None,
        owner: Any = None,
    ) -> Optional[BuiltRow]:
        """Composes the slots of row positions ``[start_pos, start_pos + sum(len(pieces)))``.

        Master positions reference the master slots (recorded as master references of the row); recomputed
        positions and :class:`NewRun` positions get fresh private slots. With ``page_size > 1`` the span must start
        on a page boundary and row pages that would mix sources are copied on write as whole pages (see the module
        docstring). ``pieces`` may be given as their :meth:`plan` (rows of the same pieces share one). Returns None
        (and changes nothing) when the allocator cannot provide the private slots.
        The caller writes ``BuiltRow.slots`` into the row, holds its private pages and locks ``BuiltRow.segs``.
        """
        page_size = self.page_size
        if page_size > 1 and start_pos % page_size != 0:
            raise ValueError(f"row span must start on a page boundary, got {start_pos} (page_size {page_size})")
        shape = pieces if isinstance(pieces, RowShape) else self.plan(pieces)
        fresh = self._alloc(shape.n_alloc)
        if fresh is None:
            return None
        out, copies, copied_pages = self._fill_private(shape.src, shape.reuse, shape.private_positions,
                                                       shape.priv_pages, fresh)
        rec = self.ensure_record(key, agent=agent, owner=owner)
        if shape.runs:  # master references (views of the shape's read-only slots)
            if not rec.refs:  # the shape's runs are sorted and disjoint
                rec.plan_refs(start_pos, shape)
                self._recount(rec, shape.distinct)
            else:
                self._merge_refs(rec, _shape_refs(start_pos, shape))
                self._recount(rec)
        rec.private_tokens += shape.n_alloc
        rec.end = max(rec.end, start_pos + len(shape.src))
        dev = fresh.device if fresh.numel() else self.device
        return BuiltRow(slots=to_device(out, dev), segs=list(shape.segs), private_tokens=shape.n_alloc,
                        private_positions=shape.private_positions, copies=copies, copied_pages=copied_pages,
                        host=out, shape=shape)

    def _fill_private(self, src, reuse, private_positions, priv_pages, fresh) -> tuple[np.ndarray, int, int]:
        """The region's slots: masters where kept, fresh slots elsewhere (``private_positions``, ascending, one fresh
        slot each in order); with pages, the reused master tokens of a copied page are copied into it (``copy_fn``).
        Returns the slots, the tokens copied and the pages copied."""
        page_size = self.page_size
        out = src.copy()
        if page_size == 1:
            out[private_positions] = to_host(fresh)
            return out, 0, 0
        copies_src: list[int] = []
        copies_dst: list[int] = []
        if len(private_positions):
            page_base = to_host(fresh, torch.int64)[::page_size]  # first slot of each fresh page
            page_index = {int(pg): j for j, pg in enumerate(priv_pages.tolist())}
            for pos in private_positions.tolist():
                dst = int(page_base[page_index[pos // page_size]]) + (pos % page_size)
                if reuse[pos]:
                    copies_src.append(int(src[pos]))
                    copies_dst.append(dst)
                out[pos] = dst
        if copies_src:
            if self.copy_fn is None:
                if fresh.numel():  # nothing recorded yet: give the fresh slots back before refusing
                    self.allocator.free(fresh)
                raise ValueError("copy-on-write of a master page needs copy_fn (page_size > 1)")
            dev = fresh.device
            self.copy_fn(to_device(np.asarray(copies_src, dtype=np.int64), dev),
                         to_device(np.asarray(copies_dst, dtype=np.int64), dev))
        return out, len(copies_src), int(np.unique(np.asarray(copies_dst, dtype=np.int64) // page_size).size)

    # ------------------------------------------------------------------ accounting

    def _refcounts(self) -> np.ndarray:
        """slot -> number of live rows whose master references include it (one pass over their master slots)."""
        kept = [rec.distinct for rec in self.rows.values() if rec.distinct.size]
        return np.bincount(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)

    def master_refcounts(self) -> dict[int, int]:
        """slot -> number of live rows whose master references include it (diagnostics)."""
        counts = self._refcounts()
        nz = np.nonzero(counts)[0]
        return dict(zip(nz.tolist(), counts[nz].tolist()))

    def check(self) -> None:
        """Every record's distinct master slots are those of its references (AssertionError if not)."""
        for rec in self.rows.values():
            assert np.array_equal(_distinct_slots(rec), np.sort(rec.distinct)), \
                f"row {rec.key!r}: its distinct master slots differ from its refs"

    def row_kv_tokens(self) -> dict[Hashable, float]:
        """Row key -> token-equivalents the live row holds: its master slots weighted by 1/refcount plus its private
        slots (the refcounts counted once for all rows)."""
        counts = self._refcounts()
        return {key: float((1.0 / counts[rec.distinct]).sum()) + rec.private_tokens for key, rec in self.rows.items()}
