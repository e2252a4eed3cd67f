"""The live composed rows: what a request's composed region holds from its composition to its release.

A region composed at admission (``init_load_back`` -> :func:`tokendance_sgl.reuse.build_row` -> :meth:`compose`)
holds, until SGLang releases its request:

* the **fresh pages** of the region -- its diff slots and the text between segments -- as ``w`` holders in the page
  ledger (:mod:`tokendance_sgl.ledger`; ``RequestState.held_pages``);
* a **lock on every segment whose master it reads** (``RequestState.reads``), so those masters stay protected.

:meth:`privatize` gives row positions that read a master private slots (the collector's selective recompute with
pages, a failed pre-pass: :meth:`recompute_region`) and drops the locks of the segments the row no longer reads.
:meth:`release` gives everything back; :meth:`roll_back` undoes a composition that failed half way.

The rows live in the tree (``CollectiveTree.live_rows``); this module reaches the tree's ledger, segment store, diff
allocator, allocator and counters through it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from tokendance_sgl.diff_alloc import BuiltRow, RowShape
from tokendance_sgl.host import to_device
from tokendance_sgl.request_state import RequestState, state_of
from tokendance_sgl.reuse import release_tails

__all__ = ["LiveRows"]


class LiveRows:
    """Every live composed row of a tree, keyed by ``id(req.kv)`` (module docstring)."""

    def __init__(self, tree: Any):
        self.tree = tree
        self._live: dict[int, RequestState] = {}

    def clear(self) -> None:
        self._live.clear()

    def held_pages(self) -> list:
        """The pages every live row holds (one array a row; for the ledger recount)."""
        return [st.held_pages for st in self._live.values()]

    def compose(self, req: Any, start_pos: int, pieces: Sequence[Any] | RowShape, *, agent: Optional[int] = None
                ) -> Optional[BuiltRow]:
        """Builds the slots of ``req``'s row positions ``[start_pos, ...)`` from master runs and new runs (diff
        allocator; ``pieces`` may be given as their plan). The live row holds their fresh pages and locks the
        segments whose masters it reads until it is released. Returns None when the pool cannot provide the private
        slots (nothing changed)."""
        tree = self.tree
        st, key = state_of(req), id(req.kv)
        shape = pieces if isinstance(pieces, RowShape) else tree.diff.plan(pieces)
        rec = tree.diff.record(key)
        already = {id(s) for s in rec.segs()} if rec is not None else ()
        new = [s for s in shape.segs if id(s) not in already]
        tree.store.lock_for_row(new)  # the segments the row reads, locked before allocating (allocation may evict)
        built = None
        try:
            built = tree.diff.build_row(key, start_pos, shape, agent=agent, owner=req.kv)
        finally:
            if built is None:
                tree.store.unlock_for_row(new)
        if built is not None:  # its fresh slots (on the host: no device read); its segment locks protect the masters
            st.reads.extend(new)
            for s in new:
                s.rows_served += 1
            self._hold(st, key, built.host[built.private_positions])
            tree.stats.counters["cow_pages"] += built.copied_pages
            tree.stats.counters["cow_tokens"] += built.copies
        return built

    def _hold(self, st: RequestState, key: int, slots: torch.Tensor | np.ndarray) -> None:
        ledger = self.tree.ledger
        pages = ledger.pages_of(slots, fresh=True)  # each page once: the row holds fresh slots only
        ledger.hold_row(pages, distinct=True)
        st.held_pages = np.concatenate([st.held_pages, pages])
        self._live[key] = st

    def privatize(self, req: Any, positions: np.ndarray) -> Optional[np.ndarray]:
        """Gives the row positions of ``req`` that read a master private diff slots (written into its ``req_to_token``
        row; their KV is then recomputed). With pages, whole row pages are copied on write: the master's KV is copied
        into the fresh page and only ``positions`` are recomputed. Positions that are the row's own already stay as
        they are. Returns the positions that became private (none: an empty array), or None (nothing changed) when
        the pool has no room."""
        tree = self.tree
        st, kv = state_of(req), req.kv
        widened = tree.diff.master_pages_of(id(kv), np.asarray(positions, dtype=np.int64))
        if widened.size == 0:
            return widened
        fresh = tree.alloc_slots(int(widened.size))
        if fresh is None:
            return None
        counters = tree.stats.counters
        if tree.page_size > 1:  # copy on write: the page keeps the master's KV except at the recomputed positions
            row = tree.req_to_token_pool.req_to_token[kv.req_pool_idx]
            tree.diff.copy_fn(row[to_device(widened, row.device)].to(torch.int64), fresh.to(torch.int64))
            counters["cow_pages"] += int(widened.size) // tree.page_size
            counters["cow_tokens"] += int(widened.size)
        released = tree.diff.privatize(id(kv), widened, fresh)
        tree.write_row(req, 0, fresh, positions=widened)
        self._hold(st, id(kv), fresh)
        for seg in released:  # segments the row reads no more
            st.reads = [s for s in st.reads if s is not seg]
            tree.store.unlock_for_row([seg])
        counters["privatized_tokens"] += int(widened.size)
        return widened

    def recompute_region(self, req: Any) -> Optional[tuple[int, int]]:
        """After a failed pre-pass: ``req``'s composed region becomes its own (every row that reads a master gets a
        private slot) and is to be computed in full at the matched prefix's positions, as a plain prefill would.
        Returns the region's rows, or None (the row is left as it was) when the pool has no room."""
        st = state_of(req)
        plan, layout = st.row_plan, st.layout
        rec = self.tree.diff.record(id(req.kv))
        masters = rec.master_positions() if rec is not None else np.empty(0, dtype=np.int64)
        if masters.size and self.privatize(req, masters) is None:
            return None
        release_tails(plan.tails)
        counters = self.tree.stats.counters
        counters["reused_tokens"] -= layout.end - layout.start - plan.compute_tokens
        counters["rollbacks"] += 1
        counters["prepass_fallbacks"] += 1
        plan.tails, plan.select, plan.compute_spans = [], [], [(layout.start, layout.end)]
        plan.lead_end = plan.lead_done = 0
        st.positions, st.namespace = layout.prefix_positions, st.match_ns
        return layout.start, layout.end

    def roll_back(self, req: Any, layout: Any) -> None:
        """Undoes a composition that failed half way: the row's holds, locks, record and claims go back; the request
        is then prefilled as if nothing had been reused."""
        st = state_of(req)
        if st.row_plan is not None:
            release_tails(st.row_plan.tails)
        self.tree.diff.pop_row(id(req.kv))
        self.release(req)
        st.positions, st.namespace = layout.prefix_positions, st.match_ns  # as matched, nothing composed
        self.tree.stats.counters["rollbacks"] += 1

    def release(self, req: Any) -> None:
        """Gives back what the live row holds: its pages and its segment locks."""
        tree = self.tree
        st = state_of(req)
        tree._free_pages(tree.ledger.release_row(st.held_pages, distinct=True))  # fresh pages, each held once
        st.held_pages = np.empty(0, dtype=np.int64)
        tree.store.unlock_for_row(st.reads)
        st.reads = []
        st.host_slots = st.row_plan = None
        self._live.pop(id(req.kv), None)
