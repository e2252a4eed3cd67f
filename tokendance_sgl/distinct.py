"""Distinct values of host index arrays in O(n), without sorting.

The scheduler's bookkeeping asks, many times per request, for the distinct pages or slots of an index array of a few
thousand entries (a row's master slots, the pages a row or a path holds). ``np.unique`` sorts (and hashes): about
200 us for 4k random slots on this CPU. :class:`Distinct` instead marks each value's index in a scratch array as long
as the largest value: three vector passes, about 10 us. Values must be non-negative integers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["Distinct"]


class Distinct:
    """A reusable scratch for :meth:`of` and :meth:`check` (grown to the largest value seen)."""

    def __init__(self, size: int = 0):
        self._mark = np.zeros(max(int(size), 1), dtype=np.int64)
        self._idx = np.arange(1024, dtype=np.int64)

    def _marked(self, values: np.ndarray, top: Optional[int] = None) -> np.ndarray:
        """Whether each entry is the one occurrence of its value that won the marking (exactly one per value).
        ``top``: the largest value, from a caller that checked the values are non-negative."""
        if top is None:
            top = int(values.max())
            if top < 0 or int(values.min()) < 0:
                raise ValueError("Distinct needs non-negative values")
        if top >= self._mark.size:
            self._mark = np.zeros(max(top + 1, 2 * self._mark.size), dtype=np.int64)
        if self._idx.size < values.size:
            self._idx = np.arange(max(values.size, 2 * self._idx.size), dtype=np.int64)
        idx = self._idx[: values.size]
        self._mark[values] = idx  # a repeated value keeps one of its indices
        return self._mark[values] == idx

    def of(self, values: np.ndarray) -> np.ndarray:
        """The distinct values of ``values``, each once, in the order of the kept occurrence (not sorted)."""
        if values.size < 2:
            return values.copy()
        keep = self._marked(values)
        return values[keep] if not keep.all() else values.copy()

    def check(self, values: np.ndarray, top: Optional[int] = None) -> bool:
        """Whether ``values`` has no repeated value (``top``: as for :meth:`_marked`)."""
        return values.size < 2 or bool(self._marked(values, top).all())
