"""The page ledger: who holds every KV page the tree keeps, and the tree's view of SGLang's allocator.

Ownership rule (who frees a KV slot). The unit is the allocator page (a slot when ``page_size == 1``). Row positions
``[0, cache_protected_len)`` of a request belong to the tree and ``[cache_protected_len, ...)`` to the request, as in
stock SGLang. A page the tree keeps has one or more **holders**, counted here per page:

* ``r`` -- radix nodes whose value contains the page (``rl``: the locked ones among them);
* ``s`` -- segment nodes holding their master pages (``sl``: the locked ones);
* ``w`` -- live request rows holding the fresh pages of the region composed for them at admission (their diff slots
  and the text between segments). A live row is always protected; the master pages it reads are protected by its
  locks on their segments (``sl``), which it keeps until it is released.

``tot`` counts the holders of a page (``r + s + w``) and ``lk`` its locked holders (``rl + sl + w``). Only ``s`` keeps
an array of its own (eviction asks which pages a segment holds alone); every other kind is counted in the totals
alone, so an update touches one array (a lock) or two (a segment hold). ``CollectiveTree.check_invariants``
recounts them all from the nodes, segments and rows.

A page is **held** while any holder holds it and **protected** while a locked holder or a row holds it. The tree
frees a page exactly when its last holder lets go. :class:`PoolView` is the allocator the tree (and SGLang's code
that reaches the allocator through the tree) sees: a free of a page some holder still holds is skipped, so a page
shared by a radix path, a segment and a live row goes back to the pool once, by whichever lets go last.

``evictable_size`` and ``protected_size`` of the tree come from here (every held page counted once, in tokens), so
``available + evictable + protected (+ the rows' private tails) == pool size`` holds idle and busy.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch

from tokendance_sgl.distinct import Distinct
from tokendance_sgl.host import to_device, to_host
from tokendance_sgl.page_counts import NO_STEPS, bump
from tokendance_sgl.slot_mirror import is_host_kept, kv_device_of

__all__ = ["PageLedger", "PoolView", "check_ledger", "slot_pages", "node_value_pages", "value_pages"]

# holder kind -> (counts as a holder, counts as a lock); the kinds in _ARRAYS also keep a count array of their own
_KINDS = {"r": (1, 0), "rl": (0, 1), "s": (1, 0), "sl": (0, 1), "w": (1, 1)}
_ARRAYS = ("s", "tot", "lk")


def slot_pages(slots: Optional[torch.Tensor | np.ndarray], page_size: int) -> np.ndarray:
    """The distinct pages of ``slots`` (host int64, sorted); a host array is read without a device copy."""
    if slots is None:
        return np.empty(0, dtype=np.int64)
    host = slots if isinstance(slots, np.ndarray) else to_host(slots, torch.int64)
    if host.size == 0:
        return np.empty(0, dtype=np.int64)
    return np.unique(host.astype(np.int64, copy=False) // page_size)


def _structured(v: np.ndarray, page_size: int) -> bool:
    """Whether host slots ``v`` are whole pages in order: every run of ``page_size`` positions is one page at
    offsets 0, 1, ... (the form SGLang's paged allocator and the composition give a row)."""
    if v.size % page_size:
        return False
    rows = v.reshape(-1, page_size)
    first = rows[:, 0]
    return bool((first % page_size == 0).all() and (rows == first[:, None] + np.arange(page_size)).all())


def node_value_pages(value: Any, page_size: int) -> np.ndarray:
    """Pages of a radix node's value, one per page in row order (a page-structured value holds whole pages); the
    distinct pages of any other value."""
    return value_pages(value, page_size)[0]


def value_pages(value: Any, page_size: int) -> tuple[np.ndarray, bool]:
    """:func:`node_value_pages` and whether the value is whole pages in order."""
    if value is None or isinstance(value, list) or value.numel() == 0:
        return np.empty(0, dtype=np.int64), True
    v = to_host(value, torch.int64)
    if page_size == 1:  # (a node's value is never written in place: a split clones both parts)
        return v, True
    if _structured(v, page_size):
        return v[::page_size] // page_size, True
    return np.unique(v // page_size), False  # not page-structured (e.g. simulated values): the distinct pages


class PageLedger:
    """Holder counts per page (see the module docstring) and the generation of every page: a page's generation
    advances whenever it is freed, so a weak reference can tell whether the page it saw is still the same KV."""

    def __init__(self, n_pages: int, page_size: int):
        self.page_size = page_size
        n = max(int(n_pages), 1)
        for name in _ARRAYS:
            setattr(self, name, np.zeros(n, dtype=np.int32))
        self.gen = np.zeros(n, dtype=np.int64)
        self._distinct = Distinct(n)  # scratch of the distinct-page checks
        self.n_held = 0
        self.n_prot = 0

    def reset(self) -> None:
        for name in _ARRAYS:
            getattr(self, name)[:] = 0
        self.gen += 1  # nothing registered before the reset is valid afterwards
        self.n_held = 0
        self.n_prot = 0

    def _grow(self, max_page: int) -> None:
        n = len(self.tot)
        if max_page < n:
            return
        new_n = max(max_page + 1, 2 * n)
        for name in (*_ARRAYS, "gen"):
            old = getattr(self, name)
            a = np.zeros(new_n, dtype=old.dtype)
            a[:n] = old
            setattr(self, name, a)

    def ensure(self, pages: np.ndarray) -> None:
        if pages.size:
            self._grow(int(pages.max()))

    def held_mask(self, pages: np.ndarray) -> np.ndarray:
        self.ensure(pages)
        return self.tot[pages] > 0

    def prot_mask(self, pages: np.ndarray) -> np.ndarray:
        self.ensure(pages)
        return self.lk[pages] > 0

    def pages_of(self, slots: torch.Tensor | np.ndarray, *, fresh: bool = False) -> np.ndarray:
        """The distinct pages of ``slots`` (host int64, each once, not sorted); a host array is read without a device
        copy. O(n), no sort (:class:`~tokendance_sgl.distinct.Distinct`). ``fresh``: the slots come from one or more
        allocations, so each is there once (and, with single-slot pages, is its own page)."""
        host = slots if isinstance(slots, np.ndarray) else to_host(slots, torch.int64)
        host = host.astype(np.int64, copy=False)
        if fresh and self.page_size == 1:
            return host.copy()  # not a view of the allocator's tensor
        return self._distinct.of(host // self.page_size if self.page_size > 1 else host)

    def _change(self, pages: np.ndarray, kind: str, delta: int, *, distinct: bool = False) -> np.ndarray:
        """Adds ``delta`` holders (or locks) of ``kind`` to ``pages``; returns the pages no one holds any more.
        ``distinct``: the caller knows ``pages`` are distinct page ids (>= 0; the checks are skipped)."""
        if pages.size == 0:
            return pages
        step = delta
        if not distinct:
            top = int(pages.max())
            if top >= self.tot.size:
                self._grow(top)
            if pages.min() < 0:
                raise ValueError("negative page id")
            if not self._distinct.check(pages, top):  # each page once, with its multiplicity as the delta
                pages, times = np.unique(pages, return_counts=True)
                step = times.astype(np.int32) * delta
        try:
            return self._apply(pages, kind, step, delta)
        except IndexError:  # a page beyond the arrays (only distinct pages get here unchecked): the first read raised
            self._grow(int(pages.max()))
            return self._apply(pages, kind, step, delta)

    def _apply(self, pages: np.ndarray, kind: str, step, delta: int) -> np.ndarray:
        """The count updates of :meth:`_change` (:func:`~tokendance_sgl.page_counts.bump`); a page outside the arrays
        raises IndexError from the first one, before anything is written."""
        holds, locks = _KINDS[kind]
        steps, step = (step.astype(np.int32), 0) if isinstance(step, np.ndarray) else (NO_STEPS, step)
        pages = pages.astype(np.int64, copy=False)
        freed = pages[:0]
        if holds:  # the holder total (and the segments' own count)
            if kind == "s":
                bump(self.s, pages, step, steps, what="s")
            up, down, dead = bump(self.tot, pages, step, steps, dead=delta < 0, what=kind)
            self.n_held += up - down
            if dead is not None:
                freed = pages[dead]
                self.gen[freed] += 1
        if locks:  # no lock kind has an array of its own: its underflow shows in the lock total
            up, down, _ = bump(self.lk, pages, step, steps, what=kind)
            self.n_prot += up - down
        return freed

    # radix holders
    def add_radix(self, pages, *, distinct: bool = False):
        return self._distinct_update(pages, "r", 1) if distinct else self._change(pages, "r", 1)

    def release_radix(self, pages, *, distinct: bool = False):
        return self._change(pages, "r", -1, distinct=distinct)

    def lock_radix(self, pages, *, distinct: bool = False):
        return self._distinct_update(pages, "rl", 1) if distinct else self._change(pages, "rl", 1)

    def unlock_radix(self, pages, *, distinct: bool = False):
        return self._distinct_update(pages, "rl", -1) if distinct else self._change(pages, "rl", -1)

    def _distinct_update(self, pages: np.ndarray, kind: str, delta: int) -> np.ndarray:
        """:meth:`_change` of one total on distinct ``pages`` -- the holders (``"r"``, a new node's pages, adding) or
        the locks (``"rl"``, a path's at every lock and unlock) -- in one compiled update, nothing freed."""
        holds = kind == "r"
        try:
            up, down, _ = bump(self.tot if holds else self.lk, pages.astype(np.int64, copy=False), delta, what=kind)
        except IndexError:
            return self._change(pages, kind, delta, distinct=True)
        if holds:
            self.n_held += up - down
        else:
            self.n_prot += up - down
        return pages[:0]

    # segment holders (a segment's pages come from :meth:`pages_of`: each page once)
    def hold_seg(self, pages):
        return self._change(pages, "s", 1, distinct=True)

    def release_seg(self, pages):
        return self._change(pages, "s", -1, distinct=True)

    def lock_seg(self, pages, *, distinct: bool = True):
        return self._change(pages, "sl", 1, distinct=distinct)

    def unlock_seg(self, pages, *, distinct: bool = True):
        return self._change(pages, "sl", -1, distinct=distinct)

    # live request rows
    def hold_row(self, pages, *, distinct: bool = False):
        return self._change(pages, "w", 1, distinct=distinct)

    def release_row(self, pages, *, distinct: bool = False):
        return self._change(pages, "w", -1, distinct=distinct)

    def exclusive_seg_pages(self, pages: np.ndarray) -> int:
        """Pages that dropping one unlocked holding segment of ``pages`` would free."""
        if pages.size == 0:
            return 0
        return int(((self.tot[pages] == 1) & (self.s[pages] == 1) & (self.lk[pages] == 0)).sum())

    def segment_only_pages(self) -> int:
        """Pages held by segments alone (no radix node, no live row)."""
        return int(((self.s > 0) & (self.tot == self.s)).sum())


class PoolView:
    """SGLang's KV allocator as the tree sees it: every free skips the pages the ledger still holds.

    Stock radix code frees through ``tree.token_to_kv_pool_allocator`` (eviction of a node's value, duplicates after
    an insert, a released row's tail). Through this view a page that another holder keeps -- a master read by other
    rows, a radix page a segment still holds -- is not returned; the ledger returns it when its last holder lets go
    (:meth:`free_pages`). Everything else is the allocator's own attribute."""

    def __init__(self, allocator: Any, ledger: PageLedger):
        self._allocator = allocator
        self._ledger = ledger
        # (row mirror, row) while the tree frees positions of one request's row (``free_segment``'s ``start_pos`` is
        # the row position): their slots are known on the host; the row ranges freed meanwhile
        self.row: Optional[tuple] = None
        self.row_frees: list = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._allocator, name)

    @property
    def allocator(self) -> Any:
        return self._allocator

    @property
    def device(self) -> Any:
        """Where the KV lives (:func:`~tokendance_sgl.slot_mirror.kv_device_of`)."""
        return kv_device_of(self._allocator)

    @contextmanager
    def freeing_row(self, mirror: Any, row: int) -> Iterator[list]:
        """``with pool.freeing_row(mirror, row) as frees:`` the frees of positions of request row ``row`` inside the
        block read their slots from its host copy ``mirror``; ``frees`` gets the ``(start, n)`` ranges freed."""
        self.row, self.row_frees = (mirror, row), []
        frees = self.row_frees
        try:
            yield frees
        finally:
            self.row, self.row_frees = None, []

    def _host_of(self, slots: torch.Tensor, start_pos: Optional[int]) -> np.ndarray:
        """``slots``' values: remembered ones (a node's value, our own tensors), else -- a slice of the row
        :attr:`row` names, at ``start_pos`` -- the row's host copy (the range is noted in :attr:`row_frees`)."""
        known = getattr(slots, "_td_host", None)
        if known is None and self.row is not None and start_pos is not None:
            mirror, row = self.row
            self.row_frees.append((start_pos, slots.numel()))
            known = mirror.get(row, start_pos, start_pos + slots.numel())
        return known if known is not None else to_host(slots, torch.int64)

    def _unheld(self, slots: torch.Tensor, start_pos: Optional[int] = None) -> Optional[torch.Tensor]:
        """``slots`` without those on held pages (None: nothing left to free); a host-kept allocator gets them as a
        host tensor. ``start_pos``: their first position in the row :attr:`row` names."""
        if slots is None or slots.numel() == 0:
            return None
        host = self._host_of(slots, start_pos)
        held = self._ledger.held_mask(host // self._ledger.page_size)
        host_kept = is_host_kept(self._allocator)  # (it takes host tensors)
        if held.any():
            host = host[~held]
            if host.size == 0:
                return None
        elif not host_kept:
            return slots  # a stock allocator frees the tensor itself
        return to_device(host, "cpu" if host_kept else slots.device)

    def free(self, free_index: torch.Tensor) -> None:
        kept = self._unheld(free_index)
        if kept is not None:
            self._allocator.free(kept)

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        kept = self._unheld(free_index, start_pos)
        if kept is None:
            return
        if kept.numel() == free_index.numel():
            self._allocator.free_segment(kept, start_pos=start_pos)
        else:
            self._allocator.free(kept)  # no longer one contiguous segment: free its pages

    def free_segments(self, segments) -> None:
        for free_index, start_pos in segments:
            self.free_segment(free_index, start_pos=start_pos)

    def free_full(self, free_index: torch.Tensor) -> None:
        self.free(free_index)

    def free_full_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        self.free_segment(free_index, start_pos=start_pos)

    def free_full_segments(self, segments) -> None:
        self.free_segments(segments)

    def free_pages(self, pages: np.ndarray, device: Any) -> None:
        """Returns ``pages`` (that the ledger reported as held by no one) to the pool."""
        if pages.size:  # in the order given (stock eviction frees a node's pages in row order)
            self._allocator.free_page_ids(to_device(pages, "cpu" if is_host_kept(self._allocator) else device))


def check_ledger(ledger: PageLedger, holds: Any, nodes: list, store: Any, rows: list) -> None:
    """Recounts every count of ``ledger`` from the holders themselves (AssertionError if one differs): the radix
    ``nodes`` in the tree (``holds``: their pages), the segments of ``store`` and the pages each live row holds
    (``rows``)."""
    ref = {k: np.zeros(len(ledger.tot), np.int64) for k in ("r", "rl", "s", "sl", "w")}
    for x in nodes:
        p = holds.pages(x)
        np.add.at(ref["r"], p, 1)
        if x.lock_ref > 0:
            np.add.at(ref["rl"], p, 1)
    store.check(ref["s"], ref["sl"])
    for pages in rows:
        np.add.at(ref["w"], pages, 1)
    counts = {"s": ref["s"], "tot": ref["r"] + ref["s"] + ref["w"], "lk": ref["rl"] + ref["sl"] + ref["w"]}
    for name, want in counts.items():
        assert np.array_equal(getattr(ledger, name).astype(np.int64), want), f"ledger {name} differs"
    held, prot = counts["tot"] > 0, counts["lk"] > 0
    assert int(held.sum()) == ledger.n_held and int(prot.sum()) == ledger.n_prot, (int(held.sum()), ledger.n_held)
    assert not (prot & ~held).any()
