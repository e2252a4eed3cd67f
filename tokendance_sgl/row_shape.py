"""The shape of a composed region: which of its positions read a master slot and which get fresh slots.

A composed region is a sequence of pieces: :class:`MasterRun` (row positions that read a segment's master slots,
minus the offsets recomputed for this row) and :class:`NewRun` (fresh slots for text the pre-pass computes).
:func:`plan_shape` derives from the pieces alone everything the diff allocator needs to compose a row besides the
fresh slots (:class:`RowShape`). It is a pure function of the pieces and the page size, so the agents of a round
that read the same copies share one plan (``plan()`` once, then one cheap composition per row, as FlashInfer's
wrappers do per batch).

Page granularity (``page_size > 1``): a row page that would mix master tokens with private tokens is copied on
write as a whole page (see :mod:`tokendance_sgl.diff_alloc`); :func:`plan_shape` decides which pages those are.

This module imports no sglang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from tokendance_sgl.distinct import Distinct
from tokendance_sgl.host import to_host
from tokendance_sgl.position_map import EMPTY_RUNS, MasterRuns

__all__ = ["NewRun", "MasterRun", "Piece", "RowShape", "plan_shape", "coalesce", "seg_id"]


@dataclass(frozen=True)
class NewRun:
    """``length`` fresh private slots (tokens computed by the normal extend)."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class MasterRun:
    """A run of row positions whose KV comes from a segment's master slots.

    ``slots[i]`` is the master slot of the run's i-th token. ``recompute`` lists offsets (0-based, within the run)
    that get private diff slots instead (their KV is recomputed for this row). ``host``: the same slots on the host,
    when the caller has them (no device read then)."""

    seg: Hashable
    slots: torch.Tensor
    recompute: Sequence[int] = ()
    host: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.slots.numel())


Piece = Union[NewRun, MasterRun]


@dataclass(frozen=True)
class RowShape:
    """What composing a row of ``pieces`` needs besides fresh slots (:func:`plan_shape`): planned once, used for every
    row composed from the same pieces (the agents of a round that read the same copies). Offsets are within the
    composed span; the arrays are read-only (the rows' master references view ``src``)."""

    pieces: tuple
    src: np.ndarray  # master slot per position (-1 in new runs)
    reuse: np.ndarray  # the position reads its master (not recomputed)
    keep: np.ndarray  # the position keeps its master slot (with pages: only whole master pages)
    private_positions: np.ndarray  # the others: they get fresh slots
    priv_pages: np.ndarray  # row pages of the private positions
    n_alloc: int  # fresh slots a row needs
    runs: tuple  # (first, end, piece index): maximal runs of kept positions from one piece
    segs: tuple  # the distinct segments of the kept runs, in order
    distinct: np.ndarray  # the distinct master slots of the kept runs
    master_runs: MasterRuns = EMPTY_RUNS  # the kept runs as (first, end, segment)


def seg_id(seg: Hashable) -> int:
    """Segments are told apart by identity (a master's node, or any hashable a test passes)."""
    return id(seg)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """The distinct values of the non-decreasing array ``x`` (no sort)."""
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if x.size > 1 else x


def coalesce(ranges: Iterable[tuple[int, int]], points: Optional[np.ndarray] = None) -> list[tuple[int, int]]:
    """The union of ``ranges`` (``(start, end)`` pairs) and of the single positions ``points`` as sorted, disjoint,
    non-touching ``(start, end)`` runs. Vectorized: a row has thousands of recomputed positions."""
    pairs = np.asarray(list(ranges), dtype=np.int64).reshape(-1, 2)
    starts, ends = pairs[:, 0], pairs[:, 1]
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.int64)
        starts, ends = np.concatenate([starts, pts]), np.concatenate([ends, pts + 1])
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return []
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])  # the furthest end so far
    first = np.concatenate([[True], starts[1:] > ends[:-1]])  # a run starts past every earlier end
    last = np.concatenate([first[1:], [True]])
    return list(zip(starts[first].tolist(), ends[last].tolist()))


def _lay_out(pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position of a composition: the master slot (-1 for new runs), whether it reads the master (not
    recomputed) and the index of its piece. Validates the pieces. The region's slots are one array (-1 filled once),
    the master runs copied into it; the flags and piece indices are repeated per piece in one call each."""
    if not pieces:
        return np.empty(0, np.int64), np.zeros(0, bool), np.empty(0, np.int64)
    masters, flags, lens, recompute, bounds = [], [], [], [], []
    off = 0
    for p in pieces:
        if isinstance(p, MasterRun):
            slots = p.host if p.host is not None else to_host(p.slots, torch.int64)
            n = len(slots)
            masters.append((off, slots))
            flags.append(True)
            if p.recompute is not None and len(p.recompute):
                offsets = np.asarray(p.recompute, dtype=np.int64)
                recompute.append(offsets)
                bounds.append((off, n, offsets.size))
        elif isinstance(p, NewRun):
            n = p.length
            if n < 0:
                raise ValueError("NewRun length must be >= 0")
            flags.append(False)
        else:
            raise TypeError(f"unknown piece {p!r}")
        lens.append(n)
        off += n
    src = np.full(off, -1, dtype=np.int64)  # new runs keep -1
    for a, slots in masters:
        src[a : a + len(slots)] = slots
    is_master = np.asarray(flags)
    reuse = np.repeat(is_master, lens)
    if (src[reuse] < 0).any():
        raise ValueError("master slots must be >= 0")
    piece_of = np.repeat(np.where(is_master, np.arange(len(pieces)), -1), lens)
    if recompute:  # validated together: each piece's offsets within [0, its length)
        offsets = np.concatenate(recompute)
        starts, ns, counts = (np.asarray(c, dtype=np.int64) for c in zip(*bounds))
        lens_of = np.repeat(ns, counts)
        bad = (offsets < 0) | (offsets >= lens_of)
        if bad.any():
            raise ValueError(f"recompute offsets must lie in [0, {int(lens_of[np.argmax(bad)])})")
        reuse[offsets + np.repeat(starts, counts)] = False
    return src, reuse, piece_of


def _kept_master_positions(src: np.ndarray, reuse: np.ndarray, piece_of: np.ndarray, page_size: int) -> np.ndarray:
    """Which positions keep their master slot: every reused one at page size 1; with pages, only whole row
    pages that are one master page at matching offsets (the other pages are copied on write)."""
    total = len(src)
    keep = reuse.copy()
    if page_size == 1:
        return keep
    for k in range(-(-total // page_size)):
        a, b = k * page_size, min((k + 1) * page_size, total)
        if not keep[a:b].any():
            continue
        ok = (b - a) == page_size and keep[a:b].all() and (piece_of[a:b] == piece_of[a]).all()
        if ok:
            s = src[a:b]
            ok = bool((s // page_size == s[0] // page_size).all() and (s % page_size == np.arange(page_size)).all())
        if not ok:
            keep[a:b] = False  # copy on write: the whole row page becomes private
    return keep


def plan_shape(pieces: Sequence[Piece], page_size: int, scratch: Optional[Distinct] = None) -> RowShape:
    """The shape of a composition of ``pieces`` (validated): what composing a row needs besides fresh slots.
    ``scratch``: a reusable scratch for the distinct master slots."""
    src, reuse, piece_of = _lay_out(pieces)
    keep = _kept_master_positions(src, reuse, piece_of, page_size)
    private_positions = np.nonzero(~keep)[0]
    priv_pages = _sorted_unique(private_positions // page_size)  # positions ascend: so do their pages
    n_alloc = int(private_positions.size) if page_size == 1 else int(priv_pages.size) * page_size
    kept_pos = np.nonzero(keep)[0]
    runs: tuple = ()
    segs: dict = {}
    distinct = np.empty(0, dtype=np.int64)
    if kept_pos.size:  # maximal runs of kept positions from one piece
        breaks = np.nonzero((np.diff(kept_pos) != 1) | (np.diff(piece_of[kept_pos]) != 0))[0] + 1
        firsts = kept_pos[np.concatenate([[0], breaks])]
        ends = kept_pos[np.concatenate([breaks - 1, [kept_pos.size - 1]])] + 1
        runs = tuple(zip(firsts.tolist(), ends.tolist(), piece_of[firsts].tolist()))
        for _a, _b, i in runs:  # ascending with positions
            segs.setdefault(seg_id(pieces[i].seg), pieces[i].seg)
        distinct = (scratch or Distinct()).of(src[kept_pos])
    for a in (src, reuse, keep, private_positions, priv_pages, distinct):
        a.flags.writeable = False
    master_runs = MasterRuns(tuple(a for a, _, _ in runs), tuple(b for _, b, _ in runs),
                             tuple(pieces[i].seg for _, _, i in runs)) if runs else EMPTY_RUNS
    return RowShape(tuple(pieces), src, reuse, keep, private_positions, priv_pages, n_alloc, runs,
                    tuple(segs.values()), distinct, master_runs)

