"""The page ledger's count updates, compiled: one loop per count array instead of five numpy calls.

A ledger update (:mod:`tokendance_sgl.ledger`) adds a step to the counts of some pages -- a few dozen for a row's
fresh pages, a few thousand for a radix path turning locked -- and needs to know how many pages went from zero to
non-zero or back, and which went to zero. In numpy that is a gather, an add, a scatter, a compare and a count per
count array, each paying its call overhead; a scheduler makes about fifteen such updates per request. :func:`bump`
does one compiled pass with numba (a dependency of SGLang), its page bounds checked before anything is written.
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np

__all__ = ["NO_STEPS", "bump"]

NO_STEPS = np.empty(0, dtype=np.int32)  # no per-page steps: every page gets the scalar step
_NO_DEAD = np.empty(0, dtype=np.bool_)


@numba.njit(cache=True, nogil=True)
def _bump(counts, pages, step, steps, dead):  # pragma: no cover  (compiled; exercised through bump)
    n = counts.size
    for i in range(pages.size):
        if pages[i] < 0 or pages[i] >= n:
            return -1, 0, 0
    up = 0
    down = 0
    negative = 0
    uniform = steps.size == 0
    mark = dead.size != 0
    for i in range(pages.size):
        p = pages[i]
        before = counts[p]
        after = before + (step if uniform else steps[i])
        counts[p] = after
        if before > 0 and after > 0:  # (most updates: a page held before and after)
            continue
        if after < 0:
            negative += 1
        elif before == 0 and after > 0:
            up += 1
        elif before > 0 and after == 0:
            down += 1
            if mark:
                dead[i] = True
    return up, down, negative


def bump(counts: np.ndarray, pages: np.ndarray, step: int, steps: np.ndarray = NO_STEPS, *, dead: bool = False,
         what: str = "") -> tuple[int, int, Optional[np.ndarray]]:
    """Adds ``step`` (or ``steps[i]``, when given) to ``counts[pages[i]]`` (int32 counts, int64 pages). Returns the
    number of pages that went from zero to non-zero, the number that went to zero, and (``dead``) the mask of the
    latter among ``pages`` (None when none did). Raises IndexError, changing nothing, for a page outside ``counts``,
    and AssertionError for a count that went negative (``what``: the count's name, for the message)."""
    mask = np.zeros(pages.size, dtype=np.bool_) if dead else _NO_DEAD
    up, down, negative = _bump(counts, pages, step, steps, mask)
    if up < 0:
        raise IndexError(f"a page id outside the ledger's {counts.size} pages")
    if negative:
        raise AssertionError(f"page ledger underflow in {what}")
    return up, down, (mask if dead and down else None)


bump(np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int64), 0)  # compiled (or loaded from its cache) at import
