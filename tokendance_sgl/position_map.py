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
from typing import Any, Optional, Sequence

import numpy as np
import torch

from tokendance_sgl.host import to_device

__all__ = ["PositionMap", "PathPositions", "shift_batch"]


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


@dataclass
class PathPositions:
    """Per radix node (by id): the breakpoints of its rows, as ``(offset within the node, shift added)``, and its
    master runs, as ``(offset within the node, length, segment)``."""

    _breaks: dict = field(default_factory=dict)
    _runs: dict = field(default_factory=dict)

    def clear(self) -> None:
        self._breaks.clear()
        self._runs.clear()

    def __len__(self) -> int:
        return len(self._breaks)

    def record(self, node: Any, start: int, pmap: Optional[PositionMap], runs: Sequence[tuple] = ()) -> None:
        """A new node holding rows ``[start, start + len(node.key))`` of a row mapped by ``pmap`` whose rows
        ``[a, b)`` reference the master of ``seg`` for each ``(a, b, seg)`` of ``runs`` (sorted by start, disjoint:
        read from the last one back to the first before the node)."""
        end = start + len(node.key)
        got = pmap.breaks_in(start, end) if pmap else None
        if got:
            self._breaks[node.id] = got
        mine = []
        for a, b, seg in reversed(runs):
            if b <= start:
                break
            if a < end:
                mine.append((max(a, start) - start, min(b, end) - max(a, start), seg))
        if mine:
            mine.reverse()
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
            head = [(o, min(n, split_len - o), s) for o, n, s in runs if o < split_len]
            tail = [(max(o, split_len) - split_len, o + n - max(o, split_len), s) for o, n, s in runs
                    if o + n > split_len]
            if head:
                self._runs[parent.id] = head
            if tail:
                self._runs[child.id] = tail

    def remove(self, node: Any) -> None:
        self._breaks.pop(node.id, None)
        self._runs.pop(node.id, None)

    def runs_of(self, node: Any, root: Any) -> list[tuple[int, int, Any]]:
        """The master runs ``(first row, end row, segment)`` on the path from the root to ``node`` (inclusive)."""
        if not self._runs:
            return []
        out, start = [], 0
        for n in reversed(_chain(node, root)):
            out.extend((start + o, start + o + k, s) for o, k, s in self._runs.get(n.id, ()))
            start += len(n.key)
        return out

    def map_of(self, node: Any, root: Any) -> PositionMap:
        """The map of the rows on the path from the root to ``node`` (inclusive)."""
        if not self._breaks:
            return PositionMap()
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
