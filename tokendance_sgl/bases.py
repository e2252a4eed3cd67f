"""Canonical bases: where a round puts the shared region of every agent's row.

In a round the shared region of every agent's row starts at position ``B`` (the base); an agent whose region would
start at position ``s <= B`` runs it shifted by ``B - s`` (a hole in its position ids), so every agent reading a
segment reads the same master copy. A gap is allowed up to ``max_gap``. :meth:`CanonicalBases.plan` covers the
region starts of the agents present with as few bases as possible: the smallest uncovered start ``s`` opens the base
``align_up(max{s_j : align_up(s_j) <= s + max_gap})``, which covers every start in ``[s, B]``. An agent whose
private part is longer than the base (its region starts after ``B``) gets a base of its own, and its own copies.
Starts and bases are positions (a history that already carries a shift starts its next region at its shifted
position).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Iterable, Optional

__all__ = ["CanonicalBases", "align_up", "remember"]

_MAX_KEYS = 256  # rounds remembered


def align_up(x: int, align: int) -> int:
    align = max(1, int(align))
    return -(-int(x) // align) * align


def remember(store: OrderedDict, key: Hashable, value) -> Any:
    """``store.setdefault(key, value)`` in a bounded LRU dict."""
    got = store.setdefault(key, value)
    store.move_to_end(key)
    while len(store) > _MAX_KEYS:
        store.popitem(last=False)
    return got


class CanonicalBases:
    """The bases of every round key. ``config`` provides ``base_align`` and ``max_gap``."""

    def __init__(self, config: Any):
        self.config = config
        self.bases: OrderedDict = OrderedDict()  # round key -> bases in use

    def reset(self) -> None:
        self.bases.clear()

    def plan(self, key: Hashable, starts: Iterable[int]) -> list[int]:
        """Opens the bases needed to cover ``starts`` (region start positions of the agents present) for round
        ``key``, with as few new bases as possible; returns the round's bases."""
        cfg = self.config
        starts = [int(x) for x in starts]
        bases = remember(self.bases, key, [])
        for s in sorted(set(starts)):
            if any(s <= b <= s + cfg.max_gap for b in bases):
                continue
            limit = s + cfg.max_gap
            reach = [x for x in starts if s <= x and align_up(x, cfg.base_align) <= limit]
            bases.append(align_up(max(reach), cfg.base_align) if reach else s)  # unaligned if no aligned one fits
        return bases

    def base_for(self, key: Hashable, start: int, max_gap: Optional[int] = None) -> int:
        """The base a region starting at position ``start`` uses: the smallest base of the round that covers it
        within ``max_gap`` (default: the configured one), opened now if none does (``start`` itself when a smaller
        ``max_gap`` leaves no other choice)."""
        gap = self.config.max_gap if max_gap is None else min(int(max_gap), self.config.max_gap)
        bases = self.bases.get(key)
        if bases is not None and any(start <= b <= start + gap for b in bases):
            self.bases.move_to_end(key)  # a base covers it already: plan would open none
        else:
            bases = self.plan(key, [start])
        fits = [b for b in bases if start <= b <= start + gap]
        if fits:
            return min(fits)
        bases.append(int(start))
        return int(start)
