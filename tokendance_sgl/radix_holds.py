"""The pages each radix node holds, and their entries in the page ledger (:mod:`tokendance_sgl.ledger`).

:class:`RadixHolds` mirrors every radix node's value on the host by its pages (a page-structured value holds whole
pages in row order; any other value its distinct pages), adds and releases them as holders when nodes are made,
split and evicted, and turns their locks on and off when a node's ``lock_ref`` goes from 0 to 1 or back
(:func:`nodes_turning`). SGLang's checkpoint unlocks a request's old path and locks its new one at once: inside
:meth:`RadixHolds.relocking` the two are settled together, so the path both share is not unlocked and locked again.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np

from tokendance_sgl.host import remember
from tokendance_sgl.ledger import PageLedger, value_pages

__all__ = ["RadixHolds", "nodes_turning"]


def _multiset_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pages of ``a`` beyond those of ``b``, counted with multiplicity (``b`` must be within ``a``)."""
    pages, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    extra = np.bincount(inv[: a.size], minlength=pages.size) - np.bincount(inv[a.size :], minlength=pages.size)
    if (extra < 0).any():
        raise AssertionError("a split node lost pages")
    return np.repeat(pages, extra)



def _distinct(lists: Iterable[list]) -> list:
    """The nodes of ``lists``, each once."""
    seen, out = set(), []
    for nodes in lists:
        for n in nodes:
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out


class RadixHolds:
    """The pages each radix node holds (host mirror of its value, keyed by node id) and their ledger entries."""

    def __init__(self, ledger: PageLedger, page_size: int):
        self.ledger = ledger
        self.page_size = page_size
        self._pages: dict[int, np.ndarray] = {}
        self._loose: set[int] = set()  # nodes whose value is not whole pages (their pages are the distinct ones)
        self._relock: Optional[list] = None  # nodes whose unlock :meth:`relocking` deferred
        self._root: Any = None

    def clear(self) -> None:
        self._pages.clear()
        self._loose.clear()

    def _derive(self, node: Any) -> np.ndarray:
        pages, whole = value_pages(node.value, self.page_size)
        self._pages[node.id] = pages
        if whole:
            self._loose.discard(node.id)
        else:
            self._loose.add(node.id)
        return pages

    def pages(self, node: Any) -> np.ndarray:
        got = self._pages.get(node.id)
        if got is None:  # a node we have not seen (the root, a simulated value): derive it once
            got = self._derive(node)
        return got

    def path_slots(self, node: Any, root: Any, path_len: int, start: int, end: int) -> Optional[np.ndarray]:
        """The slots of row positions ``[start, end)`` of the path from ``root`` to ``node`` (``path_len`` tokens),
        from the pages kept here: no device read. None when a node there is not whole pages in order (its slots are
        not known from its pages)."""
        parts, hi = [], path_len
        while hi > start and node is not root and node is not None:
            lo = hi - len(node.value)
            if lo < end:  # (the node holds some of the rows)
                if node.id in self._loose:
                    return None
                slots = self._slots(self.pages(node))
                parts.append(slots[max(start - lo, 0): min(end, hi) - lo])
            node, hi = node.parent, lo
        if hi > start:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts[::-1]) if parts else np.empty(0, dtype=np.int64)

    def path_head(self, node: Any, root: Any, n: int) -> Optional[np.ndarray]:
        """The slots of the first ``n`` positions of the path from ``root`` to ``node`` (None: as :meth:`path_slots`,
        or the path is shorter)."""
        length, x = 0, node
        while x is not root and x is not None:
            length, x = length + len(x.value), x.parent
        return self.path_slots(node, root, length, 0, n) if length >= n else None

    def _slots(self, pages: np.ndarray) -> np.ndarray:
        """The slots of whole pages ``pages``, in order."""
        ps = self.page_size
        return pages if ps == 1 else (pages[:, None] * ps + np.arange(ps)).reshape(-1)

    def add(self, node: Any, host: Optional[np.ndarray] = None) -> None:
        """A new node; ``host``: its value's slots, when the caller knows them (no device read)."""
        if host is not None:
            remember(node.value, host)  # (its eviction frees the value: known then too)
        pages = self._derive(node)  # page-structured: one page per row page of one request history (see _lock)
        self.ledger.add_radix(pages, distinct=node.id not in self._loose)

    # radix locks: the nodes whose lock_ref turned from 0 to 1 (on) or from 1 to 0 (off), one ledger update each time.
    # They lie on one path: the rows of one request history, whose positions each have a slot of their own, so
    # their page-structured values repeat no page (a loose value may share a page with its neighbour: checked).
    def _lock(self, nodes: list, delta: int) -> None:
        if nodes:
            pages = self.pages(nodes[0]) if len(nodes) == 1 else np.concatenate([self.pages(n) for n in nodes])
            distinct = not (self._loose and any(n.id in self._loose for n in nodes))
            (self.ledger.lock_radix if delta > 0 else self.ledger.unlock_radix)(pages, distinct=distinct)

    def turned_on(self, nodes: list) -> None:
        self._lock(nodes, +1)

    def turned_off(self, nodes: list) -> None:
        self._lock(nodes, -1)

    def relocking(self, root: Any) -> "RadixHolds":
        """``with holds.relocking(root):`` a window in which an unlock is followed at once by a lock (SGLang's
        checkpoint: the request's old path, then its new path). The unlock is deferred (:meth:`defer_unlock`) and
        settled with the lock (:meth:`settle_relock`): the path both share keeps its ledger locks, so only the new
        nodes' pages change instead of the whole path's twice, and neither needs a walk of its own. Nothing may read
        the radix locks of the ledger between the two. ``root``: the tree's root."""
        self._relock, self._root = [], root
        return self

    def __enter__(self) -> "RadixHolds":
        return self

    def __exit__(self, *exc) -> None:
        olds, self._relock = self._relock, None
        self._lock(_distinct(nodes_turning(old, self._root, 0) for old in olds or ()), -1)  # no lock followed

    def defer_unlock(self, node: Any) -> bool:
        """Inside :meth:`relocking`: the unlock of ``node`` (whose ``lock_ref`` was 1), settled later. False outside."""
        if self._relock is None:
            return False
        self._relock.append(node)
        return True

    def relock_pending(self) -> bool:
        return bool(self._relock)

    def settle_relock(self, node: Any, root: Any) -> None:
        """After the stock lock of ``node`` (its ``lock_ref`` was 0) that follows deferred unlocks: the ledger takes
        both. Old-path nodes locked again kept their locks; a new-path node now locked once turned on; an old-path
        node now unlocked turned off (a node is locked at least as often as any node below it)."""
        olds, self._relock = self._relock, None
        below, x = [], node
        while len(olds) == 1 and x is not root and x is not None and x is not olds[0]:
            below.append(x)
            x = x.parent
        if len(olds) == 1 and x is olds[0]:  # (the common case: the old path lies above the new nodes)
            return self._lock([n for n in below if n.lock_ref == 1], +1)
        old_ids, off = set(), []
        for old in olds:
            while old is not root and old is not None and id(old) not in old_ids:
                old_ids.add(id(old))
                if old.lock_ref == 0:
                    off.append(old)
                old = old.parent
        on, x = [], node
        while x is not root and x is not None:
            if x.lock_ref == 1 and id(x) not in old_ids:
                on.append(x)
            x = x.parent
        self._lock(off, -1)
        self._lock(on, +1)

    def split(self, parent: Any, child: Any, pages: np.ndarray, split_len: int, old_len: int) -> None:
        """``parent`` took the first ``split_len`` tokens of ``child`` (whose pages were ``pages``)."""
        ps = self.page_size
        if child.id not in self._loose and split_len % ps == 0 and pages.size * ps == old_len:
            k = split_len // ps  # whole pages: they split with the value (both values are new tensors)
            self._pages[parent.id], self._pages[child.id] = pages[:k], pages[k:]
            remember(parent.value, self._slots(pages[:k]))
            remember(child.value, self._slots(pages[k:]))
            return
        head, tail = self._derive(parent), self._derive(child)
        # The node held each of `pages`; now the parent and the child hold theirs, so a page in both (the value was
        # not whole pages) gains a holder -- and a lock, when the two are locked (the parent inherits the locks).
        gained = _multiset_minus(np.concatenate([head, tail]), pages)
        if gained.size:
            self.ledger.add_radix(gained)
            if child.lock_ref > 0:
                self.ledger.lock_radix(gained)

    def remove(self, node: Any) -> np.ndarray:
        """Forgets the node; returns the pages no holder keeps any more."""
        pages = self._pages.pop(node.id, None)
        whole = node.id not in self._loose
        self._loose.discard(node.id)
        if pages is None:
            pages, whole = value_pages(node.value, self.page_size)
        return self.ledger.release_radix(pages, distinct=whole)  # whole pages of one history: each page once


def nodes_turning(node: Any, root: Any, from_ref: int) -> list:
    """The nodes on the path from ``node`` up to ``root`` (excluded) whose ``lock_ref`` is ``from_ref``: those a lock
    (``from_ref`` 0) or an unlock (1) of ``node`` turns on or off. A node is locked at least as often as any node
    below it, so they are the path's first nodes: the walk stops at the first node locked more often."""
    turning = []
    while node is not root and node is not None and node.lock_ref == from_ref:
        turning.append(node)
        node = node.parent
    return turning
