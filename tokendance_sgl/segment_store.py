"""The segment store: shared output segments, their master KV, re-rotated copies, ids and round-aware eviction.

A **segment** is a block of tokens (one agent's output of a round) that later prompts contain at any position. Its
node (:class:`SegmentNode`) is keyed by a content hash of its token ids and namespace
(:func:`tokendance_sgl.segments.content_hash`) and holds the **master** KV slots of its tokens, the position its K
was rotated for (``anchor``), the round and agent that produced it, a lock count and its last access time.

Kinds:

* **strong** (a request with ``td_out_seg``, and every re-rotated copy): holds its master pages in the ledger for
  its whole life, independently of the radix path that produced it. Evicted by the round-aware order below.
* **weak** (a plain request's output, registered for detection): refers to pages the radix holds without holding
  them, so plain workloads keep exactly stock memory behaviour. It is valid while none of its pages was freed since
  registration (the ledger's per-page generations); locking it makes it hold its pages until the last unlock.

A **copy** is the master of a segment re-rotated to another anchor (key ``"<key>@<anchor>"``, ``copy_of`` set): one
per segment and canonical base (and, when ``page_size > 1``, per page alignment of its readers: key
``"<key>@<anchor>/<align>"``, its first token at offset ``align`` of its first page), made for all agents of a round in ONE batched copy + re-rotation
(:meth:`SegmentStore.master_copies`). A segment's master lacks its last token (the producing request never computed
that token's KV); a copy gets a slot for it, computed once per copy and round by the first row that reads it
(``tail_pending``/``tail_writer``), instead of once per agent.

Round-aware eviction (:meth:`SegmentStore.evict`, called by the tree before and after the radix leaves): unlocked
strong segments of older rounds first -- produced (or last named by a request) two or more rounds before the current
one -- oldest round first, then least recently used; after the radix leaves, the remaining unlocked ones. A segment
is dropped only if that frees at least one page.

Ids (segment tables): the store remembers every id ever registered (id -> content hash, length, namespace), across
evictions and flushes, and every id announced as ``td_out_seg`` by a request it has seen (pending).
"""

from __future__ import annotations

import logging
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from tokendance_sgl.config import TreeConfig
from tokendance_sgl.host import read_device, to_device, to_host
from tokendance_sgl.ledger import PageLedger
from tokendance_sgl.segments import SegmentDetector, content_hash

logger = logging.getLogger(__name__)

__all__ = ["SegmentNode", "IdRecord", "SegmentStore", "SegmentUnavailable"]


class SegmentUnavailable(RuntimeError):
    """The segment has no valid KV (evicted, weak and invalidated, or content-only)."""


@dataclass(eq=False)
class SegmentNode:
    key: str  # content hash of tokens + namespace ("<key>@<anchor>" for a copy)
    tokens: array  # the segment's token ids (array('q'))
    ns_key: str
    anchor: int  # position of tokens[0] the master K was computed (rotated) for
    round: int
    agent: Optional[int]
    strong: bool
    master: Optional[torch.Tensor] = None  # slot of tokens[i] for i < kv_len (int64, tree device)
    host: Optional[np.ndarray] = None  # the same slots on the host (int64, read once when the master was made)
    pages: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    holding: bool = False  # counted in the page ledger as a holder of `pages`
    lock_ref: int = 0
    row_refs: int = 0  # live request rows reading the master
    ids: set = field(default_factory=set)
    used_round: int = -1  # latest round of a request that named it
    page_gens: Optional[np.ndarray] = None  # weak segments: ledger generations of `pages` at registration
    last_access_time: float = field(default_factory=time.monotonic)
    copy_of: Optional[str] = None  # a re-rotated copy of segment `copy_of` at another anchor
    rows_served: int = 0  # request rows that have read the master (the agents sharing it)
    # a copy completed with the segment's last token (its producer never computed that KV): until the first row that
    # reads it (`tail_writer`, a row key) has computed it in the pre-pass, the slot holds a stand-in (the previous
    # token's K/V moved one position on)
    tail_pending: bool = False
    tail_writer: Optional[int] = None

    @property
    def kv_len(self) -> int:
        return 0 if self.host is None else self.host.size  # `host` mirrors `master` (set and dropped together)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"SegmentNode(key={self.key[:8]}, ids={sorted(self.ids)}, len={len(self.tokens)}, kv_len={self.kv_len}, "
            f"anchor={self.anchor}, round={self.round}, agent={self.agent}, strong={self.strong}, "
            f"holding={self.holding}, lock_ref={self.lock_ref}, row_refs={self.row_refs})"
        )


@dataclass
class IdRecord:
    key: str
    length: int
    ns_key: str
    round: int
    agent: Optional[int]


Rerotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (src slots, dst slots, delta)


class SegmentStore:
    """Segment nodes over the page ledger. ``alloc(n)`` allocates pool slots (evicting first), ``free_pages``
    returns pages no holder keeps, ``rerotate(src, dst, delta)`` copies K/V of pool slots with K rotated by
    ``delta`` positions (set once the model is known)."""

    def __init__(self, ledger: PageLedger, config: TreeConfig, *, page_size: int, device: torch.device,
                 alloc: Callable[[int], Optional[torch.Tensor]], free_pages: Callable[[np.ndarray], None]):
        self.ledger = ledger
        self.config = config
        self.page_size = page_size
        self.device = device
        self._alloc = alloc
        self._free_pages = free_pages
        self.rerotate: Optional[Rerotate] = None
        self.ids: dict[str, IdRecord] = {}  # every id ever registered (survives eviction and reset)
        self.pending_ids: dict[str, Optional[int]] = {}  # td_out_seg announced, not registered yet
        self.current_round = 0
        self.epoch = 0  # advances on every change a plan depends on
        # copies made, tokens re-rotated into them, slots of their pages before and after their tokens (page_size > 1)
        self.counters = {"master_copies": 0, "rotated_tokens": 0, "copy_pad_slots": 0}
        self.reset()

    def reset(self) -> None:
        """Drops every node without freeing (the ledger and the allocator are cleared by the caller)."""
        self._nodes: dict[str, SegmentNode] = {}
        self.n_holding = 0
        self.detector = SegmentDetector(min_len=self.config.min_segment_len)
        self.epoch += 1

    # ------------------------------------------------------------------ lookup

    def segments(self) -> list[SegmentNode]:
        return list(self._nodes.values())

    def get(self, key: Optional[str]) -> Optional[SegmentNode]:
        return self._nodes.get(key) if key is not None else None

    def for_id(self, seg_id: str) -> Optional[SegmentNode]:
        rec = self.ids.get(seg_id)
        return None if rec is None else self._nodes.get(rec.key)

    def known_id(self, seg_id: str) -> bool:
        return seg_id in self.ids or seg_id in self.pending_ids

    def has_kv(self, seg: SegmentNode) -> bool:
        """Whether ``seg`` has valid master KV now."""
        if seg.master is None:
            return False
        if seg.holding:
            return True
        return seg.page_gens is not None and np.array_equal(self.ledger.gen[seg.pages], seg.page_gens)

    def note_round(self, rnd: Optional[int]) -> None:
        if rnd is not None and rnd > self.current_round:
            self.current_round = int(rnd)

    def announce(self, seg_id: str, rnd: Optional[int]) -> None:
        """A request will register its output as ``seg_id`` (known from now on)."""
        if seg_id not in self.ids:
            self.pending_ids.setdefault(seg_id, rnd)

    def is_stale(self, seg: SegmentNode) -> bool:
        return max(seg.round, seg.used_round) + 1 < self.current_round

    # ------------------------------------------------------------------ registration

    def register(self, tokens: Sequence[int], master_slots: Optional[torch.Tensor], *, anchor: int,
                 round: Optional[int] = None, agent: Optional[int] = None, seg_id: Optional[str] = None,
                 ns_key: str = "", strong: bool = True, fresh: bool = False,
                 master_host: Optional[np.ndarray] = None) -> tuple[Optional[SegmentNode], bool]:
        """Registers ``tokens`` as a segment whose first ``len(master_slots)`` tokens have KV in ``master_slots``
        (``fresh``: slots the pool gave one request's output, so each is there once).

        A strong segment starts holding the pages of ``master_slots``; a weak one needs pages the tree holds. If a
        segment with the same content already has valid KV, ``seg_id`` becomes an alias of it and nothing is taken.
        ``master_host``: the values of ``master_slots`` when the caller knows them (no device read).
        Returns the node (None if a weak registration was refused) and whether it took ``master_slots``."""
        toks = array("q", tokens)  # own copy
        if len(toks) == 0:
            raise ValueError("a segment needs at least one token")
        key = content_hash(toks, ns_key)
        rnd = self.current_round if round is None else int(round)
        self.note_round(rnd)
        n = master_slots.numel() if master_slots is not None else 0
        if n > len(toks):
            raise ValueError(f"{n} master slots for {len(toks)} tokens")
        existing = self._nodes.get(key)
        if existing is not None:
            if self.has_kv(existing) or n == 0:
                existing.round = max(existing.round, rnd)
                existing.last_access_time = time.monotonic()
                if strong and not existing.strong:
                    self._make_strong(existing)
                self._record_id(seg_id, existing)
                self.epoch += 1
                return existing, False
            if existing.lock_ref > 0:  # cannot happen: a locked segment holds valid KV
                raise AssertionError(f"locked segment without KV: {existing!r}")
            self.drop(existing)
        master = host = None
        if n:  # our own copy of the slots, made from the host's values (handed over, or remembered by their maker)
            host = (master_host if master_host is not None and master_host.size == n
                    else np.array(to_host(master_slots, torch.int64)))  # (a read may be a view of the row: copied)
            master = to_device(host, self.device)
        pages = self.ledger.pages_of(host, fresh=fresh) if host is not None else np.empty(0, dtype=np.int64)
        if master is not None and not strong and not self.ledger.held_mask(pages).all():
            logger.debug("weak segment refused: its pages are not held by the tree")
            return None, False
        node = SegmentNode(key=key, tokens=toks, ns_key=ns_key, anchor=int(anchor), round=rnd, agent=agent,
                           strong=bool(strong), master=master, host=host, pages=pages)
        if master is not None:
            if strong:
                self._hold(node)
            else:
                node.page_gens = self.ledger.gen[pages].copy()
        self._nodes[key] = node
        self.detector.add(key, toks, ns_key)
        self._record_id(seg_id, node)
        self.epoch += 1
        if not strong:
            self._enforce_weak_cap()
        return node, master is not None

    def _record_id(self, seg_id: Optional[str], seg: SegmentNode) -> None:
        if not seg_id:
            return
        old = self.ids.get(seg_id)
        if old is not None and old.key != seg.key:
            logger.warning("segment id %r re-registered with different content; the latest wins", seg_id)
        self.ids[seg_id] = IdRecord(seg.key, len(seg.tokens), seg.ns_key, seg.round, seg.agent)
        self.pending_ids.pop(seg_id, None)
        seg.ids.add(seg_id)

    def _hold(self, seg: SegmentNode) -> None:
        self.ledger.hold_seg(seg.pages)
        seg.holding = True
        self.n_holding += 1

    def _release_hold(self, seg: SegmentNode) -> int:
        freed = self.ledger.release_seg(seg.pages)
        self._free_pages(freed)
        seg.holding = False
        self.n_holding -= 1
        return int(freed.size)

    def _make_strong(self, seg: SegmentNode) -> None:
        seg.strong = True
        if seg.master is not None and not seg.holding:
            self._hold(seg)

    def _enforce_weak_cap(self) -> None:
        weak = [s for s in self._nodes.values() if not s.strong and s.lock_ref == 0]
        excess = len(weak) - self.config.max_weak_segments
        if excess > 0:
            weak.sort(key=lambda s: s.last_access_time)
            for s in weak[:excess]:
                self.drop(s)

    def drop(self, seg: SegmentNode) -> int:
        """Removes an unlocked ``seg``; frees its pages no other holder keeps. Returns the tokens freed."""
        if seg.lock_ref > 0:
            raise RuntimeError(f"cannot drop a locked segment: {seg!r}")
        if self._nodes.get(seg.key) is seg:
            del self._nodes[seg.key]
            self.detector.remove(seg.key)
        freed = self._release_hold(seg) * self.page_size if seg.holding else 0
        seg.master = seg.host = None
        seg.pages = np.empty(0, dtype=np.int64)
        seg.page_gens = None
        self.epoch += 1
        return freed

    # ------------------------------------------------------------------ locks

    def lock(self, seg: SegmentNode) -> None:
        """Pins ``seg``: its master pages become protected and it cannot be evicted. Raises
        :class:`SegmentUnavailable` when it has no valid KV."""
        self._lock((seg,), 0)

    def unlock(self, seg: SegmentNode) -> None:
        self._unlock((seg,), 0)

    def unlock_all(self, segs: Sequence[SegmentNode]) -> None:
        """:meth:`unlock` of each of ``segs`` (a segment may repeat: once per lock), in one ledger update."""
        self._unlock(segs, 0)

    def lock_for_row(self, segs: Sequence[SegmentNode]) -> None:
        """:meth:`lock` of each of ``segs`` (distinct) for a live row that reads its master (``row_refs``)."""
        self._lock(segs, 1)

    def unlock_for_row(self, segs: Sequence[SegmentNode]) -> None:
        """:meth:`unlock` of each of ``segs`` (distinct) for a row that no longer reads it."""
        self._unlock(segs, 1)

    def _lock(self, segs: Sequence[SegmentNode], rows: int) -> None:
        """Locks each of the distinct ``segs`` (``rows``: 1 when a row reads them); the pages of those turning locked
        go into the ledger in one update. All or nothing: raises :class:`SegmentUnavailable` before any lock."""
        for seg in segs:
            if self._nodes.get(seg.key) is not seg or not self.has_kv(seg):
                raise SegmentUnavailable(f"segment has no valid KV: {seg!r}")
        now, turning = time.monotonic(), []
        for seg in segs:
            if not seg.holding:  # weak: hold while locked
                self._hold(seg)
            if seg.lock_ref == 0:
                turning.append(seg.pages)
            seg.lock_ref += 1
            seg.row_refs += rows
            seg.last_access_time = now
        if turning:  # two segments may share a page (a weak one reads radix pages): counted with multiplicity
            self.ledger.lock_seg(np.concatenate(turning), distinct=len(turning) == 1)

    def _unlock(self, segs: Sequence[SegmentNode], rows: int) -> None:
        turning = []
        for seg in segs:
            if seg.lock_ref <= 0 or seg.row_refs < rows:
                raise RuntimeError(f"unlock of a segment that is not locked{' by a row' if rows else ''}: {seg!r}")
            seg.row_refs -= rows
            seg.lock_ref -= 1
            if self._nodes.get(seg.key) is not seg:
                seg.holding = False  # dropped by reset(): the (fresh) ledger does not know it
            elif seg.lock_ref == 0:
                turning.append(seg)
        if turning:
            self.ledger.unlock_seg(np.concatenate([s.pages for s in turning]), distinct=len(turning) == 1)
            for seg in turning:  # a weak segment stops holding its pages with its last lock
                if not seg.strong and seg.holding:
                    if self._release_hold(seg):  # its pages died with it: the weak segment has no KV any more
                        self.drop(seg)
                    else:
                        seg.page_gens = self.ledger.gen[seg.pages].copy()

    # ------------------------------------------------------------------ re-rotated copies

    def master_copies(self, wants: Sequence[tuple], pinned: Optional[list]) -> list:
        """For every ``(segment, anchor[, align])``: the segment's master K rotated for position ``anchor`` whose
        first token sits at offset ``align`` of a pool page (``align``: the row position the reader puts it at,
        modulo the page size; 0 when pages are single slots) -- the segment itself, or its copy at that anchor and
        alignment. A reader at a matching offset maps every whole page of the run onto the copy's pages; other
        readers copy on write. The copies that do not exist yet are made together: one allocation and ONE batched
        copy + re-rotation for all of them. Returned nodes (and the sources of new copies) are locked and appended
        to ``pinned``; the caller unlocks them (``pinned`` None: nothing stays locked; the caller only wants the copies
        made). An entry is None when the segment has no KV or the pool has no room."""
        if pinned is None:  # the sources stay locked while the copies are allocated (the allocation may evict)
            sources: list = []
            try:
                return self._copies(wants, None, sources)
            finally:
                self._unlock(sources, 0)
        return self._copies(wants, pinned, pinned)

    def _copies(self, wants: Sequence[tuple], pinned: Optional[list], sources: list) -> list:
        ps = self.page_size
        out: list = [None] * len(wants)
        todo: dict[str, tuple[SegmentNode, int, int, list]] = {}
        for i, (seg, anchor, *rest) in enumerate(wants):
            if seg is None or not self.has_kv(seg):
                continue
            align = int(rest[0]) % ps if rest else 0
            if seg.copy_of is None and seg.anchor == anchor and int(seg.host[0]) % ps == align:
                out[i] = seg
                continue
            key = f"{seg.copy_of or seg.key}@{anchor}" + (f"/{align}" if ps > 1 else "")
            node = self._nodes.get(key)
            if node is not None and self.has_kv(node) and node.kv_len >= seg.kv_len:
                node.round = max(node.round, self.current_round)
                out[i] = node
            elif key in todo:
                todo[key][3].append(i)
            else:
                todo[key] = (seg, int(anchor), align, [i])
        self._pin([node for node in out if node is not None], pinned)  # before the allocation below (it may evict)
        if not todo:
            return out
        if self.rerotate is None:
            raise RuntimeError("re-rotation needs the model's RoPE (the store has no rerotate function)")
        srcs = [seg for seg, *_ in todo.values()]
        self._lock(srcs, 0)
        sources.extend(srcs)
        made = self._make_copies(list(todo.items()))
        self._pin(made or [], pinned)
        for (seg, _, _, idx), node in zip(todo.values(), made or ()):
            for i in idx:
                out[i] = node
        return out

    def _make_copies(self, todo: list) -> Optional[list]:
        """Makes the copies ``todo`` names (``(key, (segment, anchor, align, _))``): one allocation, one batched copy
        and re-rotation, one ledger update. Returns the new nodes (None: the pool has no room)."""
        ps = self.page_size
        segs = [seg for _, (seg, *_) in todo]
        # an incomplete master (one token short) gets its last slot too, filled with the previous token's K/V one
        # position on until a row computes it
        tails = np.array([int(seg.kv_len == len(seg.tokens) - 1) for seg in segs], dtype=np.int64)
        sizes = np.array([seg.kv_len for seg in segs], dtype=np.int64) + tails
        aligns = np.array([align for _, (_, _, align, _) in todo], dtype=np.int64)
        spans = -(-(aligns + sizes) // ps) * ps  # whole pages
        slots = self._alloc(int(spans.sum()))
        if slots is None:
            return None
        block = to_host(slots, torch.int64)  # the fresh slots, read once
        first = np.cumsum(sizes) - sizes  # each copy's first token among all copies' tokens
        starts = np.cumsum(spans) - spans  # each copy's block in the allocation
        at = np.repeat(starts + aligns - first, sizes) + np.arange(int(sizes.sum()))
        dst = block[at]  # token i of a copy: slot `align + i` of its block
        src = np.concatenate([np.append(seg.host, seg.host[-1]) if t else seg.host for seg, t in zip(segs, tails)])
        delta = np.repeat(np.array([anchor - seg.anchor for _, (seg, anchor, _, _) in todo], dtype=np.int64), sizes)
        delta[first + sizes - 1] += tails  # a stand-in last token: the previous token's K one position on
        dev = slots.device
        dst_dev = to_device(dst, dev)
        try:
            self.rerotate(to_device(src, dev), dst_dev, to_device(delta, dev))
        except BaseException:  # nothing registered yet: the fresh slots go back (the caller unlocks its pins)
            self._free_pages(self.ledger.pages_of(block))
            raise
        made, pages = [], []
        for j, (key, (seg, anchor, _, _)) in enumerate(todo):
            a, n = int(first[j]), int(sizes[j])
            stale = self._nodes.get(key)
            if stale is not None and stale.lock_ref == 0:
                self.drop(stale)
            b = int(starts[j])
            node = SegmentNode(key=key, tokens=seg.tokens, ns_key=seg.ns_key, anchor=anchor, round=self.current_round,
                               agent=seg.agent, strong=True, master=dst_dev[a : a + n], host=dst[a : a + n],
                               pages=self.ledger.pages_of(block[b : b + int(spans[j])], fresh=True),
                               copy_of=seg.copy_of or seg.key,
                               tail_pending=bool(tails[j]), holding=True)
            node.used_round = self.current_round
            pages.append(node.pages)
            self._nodes[key] = node  # no epoch step: a plan reads the base segments only, never their copies
            made.append(node)
        self.ledger.hold_seg(np.concatenate(pages))  # the copies' blocks are whole pages of one allocation
        self.n_holding += len(made)
        self.counters["master_copies"] += len(made)
        self.counters["rotated_tokens"] += int(sizes.sum())
        self.counters["copy_pad_slots"] += int((spans - sizes).sum())
        return made

    def _pin(self, segs: list, pinned: Optional[list]) -> None:
        """Locks ``segs`` (repeats allowed) into ``pinned`` (None: nothing is locked)."""
        if pinned is not None and segs:
            self._lock(segs, 0)
            pinned.extend(segs)

    # ------------------------------------------------------------------ eviction

    def evict(self, want: int, *, stale_only: bool) -> int:
        """Drops unlocked holding segments in the round-aware order until ``want`` tokens are freed."""
        cands = [s for s in self._nodes.values()
                 if s.holding and s.lock_ref == 0 and (not stale_only or self.is_stale(s))]
        if not cands:
            return 0
        cands.sort(key=lambda s: (not self.is_stale(s), max(s.round, s.used_round), s.last_access_time))
        got = 0
        for s in cands:
            if got >= want:
                break
            if self.ledger.exclusive_seg_pages(s.pages) == 0:
                continue
            got += self.drop(s)
        return got

    # ------------------------------------------------------------------ diagnostics

    def master_slots(self) -> int:
        """KV slots held by masters and their re-rotated copies."""
        return int(sum(s.kv_len for s in self._nodes.values() if s.holding))

    def stats(self) -> dict:
        segs = list(self._nodes.values())
        return {
            "segments": len(segs),
            "strong": sum(s.strong for s in segs),
            "weak": sum(not s.strong for s in segs),
            "locked": sum(s.lock_ref > 0 for s in segs),
            "holding": self.n_holding,
            "current_round": self.current_round,
            "known_ids": len(self.ids),
            "master_copies_resident": sum(s.copy_of is not None for s in segs),
            "master_copy_slots": int(sum(s.kv_len for s in segs if s.copy_of is not None and s.holding)),
            "master_slots": self.master_slots(),
            "rounds_seen": self.current_round + 1 if self.ids or self.pending_ids else 0,
            **self.counters,
        }

    def check(self, s: np.ndarray, sl: np.ndarray) -> None:
        """Adds every holding segment to the holder counts ``s``/``sl`` and checks the nodes (AssertionError)."""
        holding = 0
        for seg in self._nodes.values():
            assert seg.lock_ref >= 0 and 0 <= seg.row_refs <= seg.lock_ref, seg
            if seg.lock_ref > 0:
                assert seg.holding, f"locked segment not holding: {seg!r}"
            if seg.holding:
                holding += 1
                np.add.at(s, seg.pages, 1)
                if seg.lock_ref > 0:
                    np.add.at(sl, seg.pages, 1)
            if seg.master is not None:
                master = read_device(seg.master, torch.int64)
                assert np.array_equal(master, seg.host) and np.array_equal(np.unique(master // self.page_size),
                                                                           np.sort(seg.pages)), seg
            assert seg.copy_of is not None or seg.key in self.detector or len(seg.tokens) < self.detector.min_len, seg
        assert holding == self.n_holding, (holding, self.n_holding)
