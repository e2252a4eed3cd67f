"""Row -> position maps of aligned rows, and where the tree keeps them for its cached paths.

In the aligned layout a round's shared region sits at a canonical base: an agent whose region starts at row ``s0``
runs its rows ``>= s0`` at position ``row + gap``. A history that composes a region every round accumulates one
gap per region, so the map of a row is a non-decreasing step function: :class:`PositionMap` holds its breakpoints
(``rows[i]``: first row of step ``i``; ``shifts[i]``: the total shift from there on). Positions never decrease and
never repeat, so RoPE distances inside the row keep their order; a gap only widens the distance across it.

A cached path keeps the map of the row that built it: :class:`PathPositions` stores, per radix node, the
breakpoints that fall inside the node (offsets from the node's first row, with the shift added there). A request
that matches a path gets the path's map (:meth:`PathPositions.map_of`), so its extend and decode continue at the
positions the cached KV was computed for. Exact paths (the default namespace) have no breakpoints. It keeps the
row's master runs the same way (rows that reference a segment's master pages, with the segment): a request that
continues the path holds those shared pages too, and the KV-per-agent accounting credits them
(:meth:`PathPositions.runs_of`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional, Sequence

import numpy as np
import torch

from tokendance_sgl.host import to_device

__all__ = ["EMPTY_RUNS", "MasterRuns", "NO_SHIFT", "PositionMap", "PathPositions", "shift_batch"]


class MasterRuns:
    """Rows ``[starts[i], ends[i])`` that reference the master of ``segs[i]``, sorted by start and disjoint; iterates
    as ``(start, end, segment)``. Three tuples, not an object per run: a row has one per segment it reads, and a
    round's rows and paths keep them until they are released or evicted."""

    __slots__ = ("starts", "ends", "segs")

    def __init__(self, starts: tuple = (), ends: tuple = (), segs: tuple = ()):
        self.starts, self.ends, self.segs = starts, ends, segs

    @classmethod
    def of(cls, runs: Sequence[tuple]) -> "MasterRuns":
        """From ``(start, end, segment)`` triples (a ``MasterRuns`` is returned as it is)."""
        if isinstance(runs, MasterRuns):
            return runs
        return cls(*map(tuple, zip(*runs))) if runs else EMPTY_RUNS

    def __iter__(self):
        return zip(self.starts, self.ends, self.segs)

    def __len__(self) -> int:
        return len(self.starts)

    def __eq__(self, other: Any) -> bool:
        try:
            return list(self) == [tuple(r) for r in other]
        except TypeError:
            return NotImplemented

    def __hash__(self) -> int:
        return hash((self.starts, self.ends, self.segs))

    def __repr__(self) -> str:
        return f"MasterRuns({list(self)})"

    def shifted(self, by: int) -> "MasterRuns":
        if not by or not self.starts:
            return self
        return MasterRuns(tuple(a + by for a in self.starts), tuple(b + by for b in self.ends), self.segs)

    def window(self, lo: int, hi: Optional[int] = None) -> "MasterRuns":
        """The runs inside rows ``[lo, hi)`` (``hi`` None: no end), clipped to them, counted from ``lo``."""
        starts, ends = self.starts, self.ends
        i0 = bisect.bisect_right(ends, lo)  # the first run ending after lo (ends ascend: the runs are disjoint)
        i1 = len(starts) if hi is None else bisect.bisect_left(starts, hi)
        if i0 >= i1:
            return EMPTY_RUNS
        s, e = list(starts[i0:i1]), list(ends[i0:i1])
        if s[0] < lo:
            s[0] = lo
        if hi is not None and e[-1] > hi:
            e[-1] = hi
        return MasterRuns(tuple(a - lo for a in s), tuple(b - lo for b in e), self.segs[i0:i1])

    @staticmethod
    def concat(parts: Sequence["MasterRuns"]) -> "MasterRuns":
        """The runs of ``parts`` one after the other (each after the one before)."""
        parts = [p for p in parts if p.starts]
        if len(parts) <= 1:
            return parts[0] if parts else EMPTY_RUNS
        return MasterRuns(*(tuple(chain.from_iterable(getattr(p, f) for p in parts)) for f in MasterRuns.__slots__))


EMPTY_RUNS = MasterRuns()


@dataclass(frozen=True)
class PositionMap:
    rows: tuple = ()  # sorted first rows of each step
    shifts: tuple = ()  # total shift from rows[i] on (strictly increasing)

    @property
    def total(self) -> int:
        """The shift of every row after the last breakpoint."""
        return self.shifts[-1] if self.shifts else 0

    def __bool__(self) -> bool:
        return bool(self.rows)

    def position_of(self, row: int) -> int:
        k = bisect.bisect_right(self.rows, row) - 1
        return row + (self.shifts[k] if k >= 0 else 0)

    def with_gap(self, row: int, gap: int) -> "PositionMap":
        """This map with rows ``>= row`` shifted ``gap`` further (``row`` after every breakpoint)."""
        if gap <= 0:
            return self
        if self.rows and row < self.rows[-1]:
            raise ValueError(f"a new gap at row {row} must follow the last breakpoint {self.rows[-1]}")
        if self.rows and row == self.rows[-1]:
            return PositionMap(self.rows, self.shifts[:-1] + (self.shifts[-1] + gap,))
        return PositionMap(self.rows + (int(row),), self.shifts + (self.total + int(gap),))

    def breaks_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """``(offset from start, shift added there)`` for the breakpoints in rows ``[start, end)``."""
        out = []
        prev = 0
        for r, s in zip(self.rows, self.shifts):
            if start <= r < end:
                out.append((r - start, s - prev))
            prev = s
        return out


_STRIDE = 1 << 32  # rows of one request stay below this (positions are int64)


def shift_batch(positions: torch.Tensor, maps: Sequence[Optional[PositionMap]], lengths: Sequence[int]) -> None:
    """In place, for a whole batch at once: ``positions`` holds ``lengths[k]`` entries of request ``k`` (each equal
    to its row), and ``maps[k]`` (None: identity) is applied to them. The host builds one boundary per breakpoint;
    the device runs one bucketize and one gather, whatever the number of requests."""
    keys: list[int] = []
    values: list[int] = []
    for k, pmap in enumerate(maps):
        rows = pmap.rows if pmap else ()
        if not rows or rows[0] != 0:
            keys.append(k * _STRIDE)  # every request starts with a boundary of its own (shift 0 before its steps)
            values.append(0)
        keys.extend(k * _STRIDE + r for r in rows)
        values.extend(pmap.shifts if pmap else ())
    if len(keys) == len(maps):
        return  # no breakpoint anywhere
    dev, dt = positions.device, positions.dtype
    owner = torch.repeat_interleave(torch.arange(len(maps), device=dev, dtype=torch.int64),
                                    to_device(np.asarray(lengths, dtype=np.int64), dev), output_size=positions.numel())
    at = torch.bucketize(owner * _STRIDE + positions.to(torch.int64), to_device(np.asarray(keys, dtype=np.int64), dev),
                         right=True) - 1
    positions += to_device(np.asarray(values, dtype=np.int64), dev).to(dt)[at]  # (copies from pinned memory)


NO_SHIFT = PositionMap()  # every row at its own position (frozen: one object serves every such row)


@dataclass
class PathPositions:
    """Per radix node (by id): the breakpoints of its rows, as ``(offset within the node, shift added)``, and its
    master runs (:class:`MasterRuns`, counted from the node's first row)."""

    _breaks: dict = field(default_factory=dict)
    _runs: dict = field(default_factory=dict)

    def clear(self) -> None:
        self._breaks.clear()
        self._runs.clear()

    def __len__(self) -> int:
        return len(self._breaks)

    def record(self, node: Any, start: int, pmap: Optional[PositionMap], runs: Sequence[tuple] = ()) -> None:
        """A new node holding rows ``[start, start + len(node.key))`` of a row mapped by ``pmap`` whose rows
        ``[a, b)`` reference the master of ``seg`` for each ``(a, b, seg)`` of ``runs`` (a :class:`MasterRuns`, or
        triples sorted by start and disjoint)."""
        end = start + len(node.key)
        got = pmap.breaks_in(start, end) if pmap else None
        if got:
            self._breaks[node.id] = got
        mine = MasterRuns.of(runs).window(start, end) if runs else EMPTY_RUNS
        if mine.starts:
            self._runs[node.id] = mine

    def split(self, parent: Any, child: Any, split_len: int) -> None:
        got = self._breaks.pop(child.id, None)
        if got:
            head = [(o, g) for o, g in got if o < split_len]
            tail = [(o - split_len, g) for o, g in got if o >= split_len]
            if head:
                self._breaks[parent.id] = head
            if tail:
                self._breaks[child.id] = tail
        runs = self._runs.pop(child.id, None)
        if runs:
            head, tail = runs.window(0, split_len), runs.window(split_len)
            if head.starts:
                self._runs[parent.id] = head
            if tail.starts:
                self._runs[child.id] = tail

    def remove(self, node: Any) -> None:
        self._breaks.pop(node.id, None)
        self._runs.pop(node.id, None)

    def runs_of(self, node: Any, root: Any) -> MasterRuns:
        """The master runs on the path from the root to ``node`` (inclusive)."""
        if not self._runs:
            return EMPTY_RUNS
        parts, start = [], 0
        for n in reversed(_chain(node, root)):
            got = self._runs.get(n.id)
            if got is not None:
                parts.append(got.shifted(start))
            start += len(n.key)
        return MasterRuns.concat(parts)

    def map_of(self, node: Any, root: Any) -> PositionMap:
        """The map of the rows on the path from the root to ``node`` (inclusive)."""
        if not self._breaks:
            return NO_SHIFT
        rows, shifts, start, total = [], [], 0, 0
        for n in reversed(_chain(node, root)):
            for off, gap in self._breaks.get(n.id, ()):
                total += gap
                rows.append(start + off)
                shifts.append(total)
            start += len(n.key)
        return PositionMap(tuple(rows), tuple(shifts))


def _chain(node: Any, root: Any) -> list:
    """The nodes from ``node`` up to (not including) ``root``."""
    chain = []
    while node is not None and node is not root:
        chain.append(node)
        node = node.parent
    return chain
