"""The collective tree: SGLang's radix cache plus shared segments (the ``tokendance`` prefix-cache backend).

:class:`CollectiveTree` subclasses SGLang's :class:`~sglang.srt.mem_cache.radix_cache.RadixCache` and is thin glue
from SGLang's cache contract to the parts of the system (``docs/architecture.md``):

* :mod:`~tokendance_sgl.ledger` -- who holds every page (radix nodes, segments, live rows); the allocator view that
  never frees a page some holder keeps;
* :mod:`~tokendance_sgl.segment_store` -- segment nodes, ids, masters and their re-rotated copies, round-aware
  eviction;
* :mod:`~tokendance_sgl.planning` -- which segments a prompt contains (segment tables, detection);
* :mod:`~tokendance_sgl.reuse` and :mod:`~tokendance_sgl.collector` -- composing rows from masters, once per round;
* :mod:`~tokendance_sgl.live_rows` -- what a composed row holds (fresh pages, segment locks) until its release;
* :mod:`~tokendance_sgl.position_map` -- the position map of aligned rows, kept with the cached paths;
* :mod:`~tokendance_sgl.accounting` -- counters and KV per agent;
* :mod:`~tokendance_sgl.request_state` -- ``req.td``, everything we keep about a request.

For ordinary prefixes it *is* the radix cache: insert, match, split, lock and LRU eviction come from ``super()``.
What it adds, in SGLang's own hooks:

* ``match_prefix`` plans the request's segments and offers the rows up to the end of the last resident segment as
  SGLang's "host hit"; ``init_load_back`` (after ``PrefillAdder`` budgeted them) composes those rows from masters.
  The composed region is the tree's (``load_back_is_cache_owned``): the live row holds its fresh pages in the ledger
  and locks the segments whose masters it reads, so SGLang's positional ownership rule holds unchanged and its
  busy-mode memory check counts every slot once.
* ``checkpoint`` inserts the whole row -- composed region included -- like any row, so an agent's next turn or round
  continues from it (persistent agent caches). A row that read approximate KV (any policy but ``full``) is inserted
  under its policy's **namespace** (``RadixKey.extra_key`` ``"td:<policy>"``, after the request's own extra key):
  only requests of the same policy match it; exact requests (``full``, or no reuse) never see it. The path keeps
  the row's position map (:class:`~tokendance_sgl.position_map.PathPositions`), so a continuation runs at the
  positions the cached KV was computed for. A finished request's output is registered as a segment.
* ``evict`` drops stale segments first, then radix leaves (stock order), then the other segments; a page goes back
  to the pool when its last holder lets go.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sglang.srt.mem_cache.base_prefix_cache import (
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InitLoadBackParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import _req_radix_key
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from tokendance_sgl.accounting import TreeStats, pool_bytes_per_token
from tokendance_sgl.bases import CanonicalBases
from tokendance_sgl.collector import KVCollector
from tokendance_sgl.config import TreeConfig
from tokendance_sgl.faults import Faults
from tokendance_sgl.diff_alloc import BuiltRow, DiffAllocator, RowShape
from tokendance_sgl.early_match import EarlyMatch, LongestKeys, approx_namespace, best_match
from tokendance_sgl.host import read_device, to_device, to_host
from tokendance_sgl.ledger import PageLedger, PoolView, check_ledger
from tokendance_sgl.radix_holds import RadixHolds, nodes_turning
from tokendance_sgl.live_rows import LiveRows
from tokendance_sgl.outputs import register_output
from tokendance_sgl.planning import plan_for, validate_request
from tokendance_sgl.position_map import EMPTY_RUNS, PathPositions
from tokendance_sgl.request_state import RowLayout, SegmentPlan, state_of
from tokendance_sgl.reuse import Composed, build_row, plan_layout, release_tails, request_policy
from tokendance_sgl.rope import RopeSpec
from tokendance_sgl.segment_store import SegmentStore
from tokendance_sgl.selection import parse_policy
from tokendance_sgl.slot_mirror import RowMirror, keep_on_host, write_row

logger = logging.getLogger(__name__)

__all__ = ["CollectiveTree", "approx_namespace"]


class CollectiveTree(RadixCache):
    """SGLang's radix cache plus segments, persistent composed rows and exact page accounting (module docstring).

    ``config`` defaults to :meth:`TreeConfig.from_env`. ``copy_fn(src, dst)`` copies K/V of pool slots
    (copy-on-write pages, ``page_size > 1``; default: :func:`tokendance_sgl.kernels.copy_kv_slots` on the KV pool).
    ``bytes_per_token`` (K+V bytes of one token over all layers) defaults to the pool's size."""

    collector_class = KVCollector

    def __init__(self, params: CacheInitParams, config: Optional[TreeConfig] = None, *,
                 copy_fn: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
                 bytes_per_token: Optional[float] = None):
        self.config = config if config is not None else TreeConfig.from_env()
        self.policy = parse_policy(self.config.recompute)
        self.faults = Faults.parse(self.config.test_faults)
        page_size = params.page_size
        alloc = params.token_to_kv_pool_allocator
        size = getattr(alloc, "size", None) if alloc is not None else None
        self.ledger = PageLedger(int(size) // page_size + 2 if size else 1024, page_size)
        self.radix_holds = RadixHolds(self.ledger, page_size)
        self.path_positions = PathPositions()
        self.longest_keys = LongestKeys(page_size)  # (early_match.py: when the exact namespace need not be walked)
        self.pool = PoolView(alloc, self.ledger) if alloc is not None else None
        self.stats = TreeStats()
        self.bases = CanonicalBases(self.config)
        dev = self.pool.device if self.pool is not None else "cpu"
        self.store = SegmentStore(self.ledger, self.config, page_size=page_size,
                                  device=torch.device(dev if isinstance(dev, (str, torch.device)) else "cpu"),
                                  alloc=self.alloc_slots, free_pages=self._free_pages)
        self.collector = self.collector_class(self)
        self.rope: Optional[RopeSpec] = None  # set by build_collective_tree from the loaded model
        self.live_rows = LiveRows(self)  # every live composed row: its fresh pages and segment locks
        self._inserting: Optional[tuple] = None  # (state, diff record, row) of the row a checkpoint is inserting
        self.row_mirror: Optional[RowMirror] = None
        self.templates: OrderedDict = OrderedDict()  # region compositions shared by a round's rows (reuse.py)
        self.tp_size = 1  # set by build_collective_tree
        super().__init__(dataclasses.replace(params, token_to_kv_pool_allocator=self.pool))  # calls reset()
        rtt = getattr(self.req_to_token_pool, "req_to_token", None)
        self.context_len = int(rtt.shape[1]) if rtt is not None else 1 << 30
        self.diff = DiffAllocator(
            self.pool, page_size=page_size,
            bytes_per_token=bytes_per_token if bytes_per_token is not None else pool_bytes_per_token(alloc),
            copy_fn=copy_fn if copy_fn is not None else self._pool_copy, alloc_fn=self.alloc_slots)
        # the slots as the host knows them (tokendance_sgl.slot_mirror): the allocator's free list and the rows
        if rtt is not None:
            self.row_mirror = RowMirror(*rtt.shape)
            self.req_to_token_pool.tokendance_rows = self.row_mirror  # (patches/row_mirror.py follows SGLang's writes)
        if alloc is not None:
            keep_on_host(alloc, self.row_mirror)

    # ================================================================== lifecycle and pool

    def reset(self):
        super().reset()
        self._evictions = getattr(self, "_evictions", 0) + 1
        self.ledger.reset()
        self.radix_holds.clear()
        self.path_positions.clear()
        self.longest_keys.clear()
        self.store.reset()
        self.collector.reset()
        self.bases.reset()
        self.templates.clear()
        self.stats.reset_rounds()
        self.live_rows.clear()
        if hasattr(self, "diff"):
            self.diff.clear()

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        """Slots for composed rows and copies (``n``: whole pages): evict like SGLang's ``alloc_token_slots`` does,
        then allocate."""
        if n % self.page_size:
            raise ValueError(f"{n} slots asked of a pool of {self.page_size}-token pages")
        alloc = self.pool.allocator
        if alloc.available_size() < n:  # (SGLang's evict_to_free_tokens: nothing to do when the pool has room)
            alloc.evict_to_free_tokens(self, n)
        return alloc.alloc(n)

    def _free_pages(self, pages: np.ndarray) -> None:
        if self.pool is not None:
            self.pool.free_pages(pages, self.device)

    def _kv_pool(self):
        kv = self.pool.get_kvcache() if self.pool is not None else None
        if kv is None or not hasattr(kv, "k_buffer"):
            raise RuntimeError("segment reuse needs a KV pool with k_buffer/v_buffer")
        return kv

    def _pool_copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        from tokendance_sgl.kernels import copy_kv_slots

        kv = self._kv_pool()
        copy_kv_slots(kv.k_buffer, kv.v_buffer, src, dst)

    def rerotate_into(self, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None:
        """Copies K/V of slots ``src`` into ``dst`` with K rotated by ``delta`` positions (one batched call)."""
        from tokendance_sgl.kernels import copy_rerotate_k

        if self.rope is None:
            raise RuntimeError("re-rotation needs the model's RoPE spec (CollectiveTree.rope is not set)")
        kv = self._kv_pool()
        self.faults.check("copy", self.store.current_round)
        copy_rerotate_k(kv.k_buffer, kv.v_buffer, src, dst, delta, **self.rope.kernel_kwargs())

    # ================================================================== accounting (the ledger counts every page once)

    def evictable_size(self):
        return 0 if self.disable else (self.ledger.n_held - self.ledger.n_prot) * self.page_size

    def protected_size(self):
        return 0 if self.disable else self.ledger.n_prot * self.page_size

    def total_size(self):
        return self.ledger.n_held * self.page_size

    def segment_only_size(self) -> int:
        return self.ledger.segment_only_pages() * self.page_size

    # ================================================================== radix: the ledger follows the nodes

    def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
        before = self.evictable_size_
        prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
        if self.evictable_size_ != before:  # the stock helper created exactly one new leaf: `last`
            self.longest_keys.note(key, from_root=node is self.root_node)  # (a path only gets longer here)
            st, rec, row = self._inserting or (None, None, None)
            # its value is the inserting row's positions [prefix_len, ...): known on the host
            host = self.row_mirror.get(row, prefix_len, prefix_len + len(last.value)) if row is not None else None
            self.radix_holds.add(last, host)
            # the row's position map and master runs go with the node
            self.path_positions.record(last, prefix_len, *((st.positions, st.master_runs(rec)) if st else (None, ())))
        return prefix_len, last

    def _split_node(self, key, child, split_len):
        pages, old_len = self.radix_holds.pages(child), len(child.value)
        new_node = super()._split_node(key, child, split_len)
        self.radix_holds.split(new_node, child, pages, split_len, old_len)
        self.path_positions.split(new_node, child, split_len)
        return new_node

    def _delete_leaf(self, node):
        self._evictions += 1  # a kept match (early_match.py) may end at or pass through this node
        super()._delete_leaf(node)  # the stock evict's free of the node's value skipped the pages it held
        self.path_positions.remove(node)
        self._free_pages(self.radix_holds.remove(node))

    def inc_lock_ref(self, node: TreeNode) -> IncLockRefResult:
        if self.disable or node.lock_ref > 0:  # its ancestors are locked at least as often: none turns on
            super().inc_lock_ref(node)
            return IncLockRefResult(delta=0)
        ev0 = self.evictable_size()
        if self.radix_holds.relock_pending():  # (a checkpoint: settled with the unlock it deferred)
            super().inc_lock_ref(node)
            self.radix_holds.settle_relock(node, self.root_node)
        else:
            turning = nodes_turning(node, self.root_node, 0)
            super().inc_lock_ref(node)
            self.radix_holds.turned_on(turning)
        return IncLockRefResult(delta=self.evictable_size() - ev0)

    def dec_lock_ref(self, node: TreeNode, params: Optional[DecLockRefParams] = None) -> DecLockRefResult:
        if self.disable or node.lock_ref > 1:  # and none of them turns off
            super().dec_lock_ref(node, params)
            return DecLockRefResult(delta=0)
        if self.radix_holds.defer_unlock(node):  # (a checkpoint: the lock that follows settles it)
            super().dec_lock_ref(node, params)
            return DecLockRefResult(delta=0)
        turning, ev0 = nodes_turning(node, self.root_node, 1), self.evictable_size()
        super().dec_lock_ref(node, params)
        self.radix_holds.turned_off(turning)
        return DecLockRefResult(delta=self.evictable_size() - ev0)

    def evict(self, params: EvictParams) -> EvictResult:
        """Stale segments, then radix leaves in SGLang's order, then the remaining segments."""
        if self.disable:
            return EvictResult()
        want = int(params.num_tokens)
        got = self.store.evict(want, stale_only=True) if want > 0 and self.store.n_holding else 0
        got += self._evict_radix(want - got)
        if got < want and self.store.n_holding:
            got += self.store.evict(want - got, stale_only=False)
        return EvictResult(num_tokens_evicted=got)

    def _evict_radix(self, want: int) -> int:
        """Stock radix eviction, repeated until the pool really got ``want`` tokens back (a leaf whose pages another
        holder keeps frees nothing)."""
        got = 0
        while got < want and self.evictable_leaves:
            before = self.pool.available_size()
            super().evict(EvictParams(num_tokens=want - got))
            got += self.pool.available_size() - before
        return got

    # ================================================================== planning and matching

    def plan_for(self, req: Any, *, force: bool = False) -> SegmentPlan:
        return plan_for(self.store, self.config, req, force=force)

    def validate_request(self, req: Any) -> Optional[str]:
        """The error that should fail ``req`` with HTTP 400, or None (also records ``req.td.plan``)."""
        error = validate_request(None if self.disable else self.store, self.config, req)
        if error is None and int(getattr(getattr(req, "sampling_params", None), "beam_width", 1) or 1) > 1:
            error = "beam search (beam_width > 1) is not supported with the tokendance and pic backends"
        if error is None and self.tp_size > 1 and request_policy(self, req).needs_scores:
            error = f"td_recompute {request_policy(self, req)} needs tp-size 1 (this server runs tp-size {self.tp_size})"
        return error

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        req = params.req
        if req is None or self.disable:
            return super().match_prefix(params)
        continued = getattr(getattr(req, "kv", None), "holds_kv", False)  # a row being continued (chunked prefill)
        early = state_of(req).early if not (continued or req.output_ids) else None
        if early is not None and not early.holds(params.key, self._evictions):
            early = None
        res = early.result if early is not None else super().match_prefix(params)
        if continued:
            return res  # planned at admission
        try:
            self.plan_for(req)
            st = state_of(req)
            if early is not None:  # the collective step's match still holds
                self.stats.counters["matches_shared"] += 1
                st.match_ns, st.positions = early.namespace, early.positions
            else:
                res, st.match_ns, st.positions = best_match(self, request_policy(self, req), req, params.key, res)[:3]
            st.path_runs = (self.path_positions.runs_of(res.last_device_node, self.root_node) if st.match_ns
                            else EMPTY_RUNS)
            st.namespace = st.match_ns
            st.layout = None
            if self.config.reuse:
                kept, layout = early.layout_for(st.plan, self.store.epoch) if early is not None else (False, None)
                st.layout = layout if kept else plan_layout(self, req, res.device_prefix_len, len(params.key),
                                                            st.positions)
                if st.layout is not None:  # PrefillAdder budgets the region, then init_load_back composes it
                    res = res._replace(host_hit_length=st.layout.end - st.layout.start)
        except Exception:  # planning is advisory; never take the scheduler down
            logger.exception("tokendance: segment planning failed for request %s", getattr(req, "rid", "?"))
        return res

    def early_layout(self, req: Any) -> Optional[RowLayout]:
        """The region a waiting request would compose if admitted now (for the collective step), planned on the
        cached prefix it would match. Match and layout are kept for the request's admission
        (:mod:`tokendance_sgl.early_match`)."""
        st = state_of(req)
        toks = req.origin_input_ids if not req.output_ids else req.origin_input_ids + req.output_ids
        key = _req_radix_key(self, req, toks, max_prefix_len=req._compute_max_prefix_len(len(toks)))
        res, ns, pmap, exact, alt, unwalked = best_match(self, request_policy(self, req), req, key)
        layout = plan_layout(self, req, res.device_prefix_len, len(key), pmap) if self.config.reuse else None
        st.early = EarlyMatch.of(key, self._evictions, (exact, alt), self.page_size, res, ns, pmap, layout,
                                 (st.plan, self.store.epoch), unwalked)
        return layout

    # ================================================================== composing a row (SGLang's load-back path)

    def init_load_back(self, params: InitLoadBackParams):
        """Composes the request's segment region. All promised tokens or none: 0 makes SGLang prefill it normally."""
        req = params.req
        node = req.last_node if req is not None else params.best_match_node
        st = state_of(req) if req is not None else None
        layout = st.layout if st is not None else None
        if layout is None or layout.start != req.prefix_len or layout.end - layout.start != params.host_hit_length:
            return 0, node
        if layout.start % self.page_size or layout.end % self.page_size:  # plan_layout never makes one; never compose
            logger.error("tokendance: region [%d, %d) of request %s is not whole pages; prefilling it normally",
                         layout.start, layout.end, req.rid)
            return 0, node
        try:
            out = self.build_row(req, layout)
            if out is not None:
                st.host_slots, st.row_plan, st.positions = out
                self.faults.check("compose", self.store.current_round)
                if layout.policy.reuses_masters:
                    st.namespace = approx_namespace(req.extra_key, layout.policy)
                self.stats.note_load(layout.stats)
        except Exception:
            logger.exception("tokendance: composing the row of request %s failed; prefilling it normally", req.rid)
            self.live_rows.roll_back(req, layout)
            out = None
        if out is None:
            self.stats.counters["load_back_fallbacks"] += 1
            return 0, node
        return layout.end - layout.start, node

    def build_row(self, req: Any, layout: Any) -> Optional[Composed]:
        """Composes ``req``'s reused region (:func:`tokendance_sgl.reuse.build_row`; the ``pic`` backend overrides)."""
        return build_row(self, req, layout)

    def load_back_is_cache_owned(self) -> bool:
        return True  # the composed region is the tree's: the live row holds its pages (or locks their segments)

    def prefix_device_indices(self, req: Any) -> torch.Tensor:
        """The matched path's slots (and the composed region's), remembered with their host values."""
        extra = state_of(req).host_slots
        r = req.prefix_len - (int(extra.numel()) if extra is not None else 0)
        host = self.radix_holds.path_head(req.last_node, self.root_node, r)
        if host is not None:  # made from the host's values (a non-blocking copy on a GPU)
            host = host if extra is None else np.concatenate([host, to_host(extra, torch.int64)])
            return to_device(host, self.device)
        if extra is None:
            return super().prefix_device_indices(req)
        path = self.path_device_indices(req.last_node)[:r] if r > 0 else extra[:0]
        return torch.cat([path.to(device=extra.device, dtype=torch.int64), extra.to(torch.int64)])

    def write_row(self, req: Any, start: int, slots: torch.Tensor, positions: Optional[np.ndarray] = None) -> None:
        """Writes ``slots`` into ``req``'s ``req_to_token`` row at ``[start, ...)`` (or at ``positions``), and into
        its host copy."""
        write_row(self.req_to_token_pool.req_to_token, self.row_mirror, req.kv.req_pool_idx, start, slots, positions)

    def free_kv_row(self, kv: Any, ranges: list) -> None:
        """SGLang's release of row positions: their slots are known from the row's host copy."""
        if self.pool is None or self.row_mirror is None:
            return super().free_kv_row(kv, ranges)
        with self.pool.freeing_row(self.row_mirror, kv.req_pool_idx):
            super().free_kv_row(kv, ranges)

    # the live rows (tokendance_sgl.live_rows): the host protocol of reuse.py and the collector
    def compose_row(self, req: Any, start_pos: int, pieces: Sequence[Any] | RowShape, *, agent: Optional[int] = None
                    ) -> Optional[BuiltRow]:
        return self.live_rows.compose(req, start_pos, pieces, agent=agent)

    def privatize(self, req: Any, positions: np.ndarray) -> Optional[np.ndarray]:
        return self.live_rows.privatize(req, positions)

    def recompute_region(self, req: Any) -> Optional[tuple[int, int]]:
        return self.live_rows.recompute_region(req)

    # ================================================================== checkpoint, registration, release

    def checkpoint(self, req: Any, *, up_to: int):
        if self.disable:
            return
        st = state_of(req)
        extra, row, start = req.extra_key, req.kv.req_pool_idx, req.kv.cache_protected_len
        self._inserting = (st, self.diff.record(id(req.kv)), row if self.row_mirror is not None else None)
        if st.namespace is not None:  # an approximate row goes under its policy's namespace (stock insert)
            req.extra_key = st.namespace
        mirrored = self.pool is not None and self.row_mirror is not None
        frees = self.pool.freeing_row(self.row_mirror, row) if mirrored else nullcontext([])
        try:  # (the insert frees the row's duplicate positions; the stock checkpoint unlocks, then locks)
            with frees as rewritten, self.radix_holds.relocking(self.root_node):
                super().checkpoint(req, up_to=up_to)
        finally:
            req.extra_key = extra
            self._inserting = None
        # The stock checkpoint points the row's [start, end) at the inserted path: that differs from the row only where
        # the tree had the tokens already (the insert freed the row's duplicates there, the ranges seen above).
        end = req.kv.cache_protected_len
        for a, n in (rewritten if end > start else ()):
            b = min(a + n, end)
            if b > a >= start:
                self.row_mirror.write(row, a, self.radix_holds.path_slots(req.last_node, self.root_node, end, a, b), b)
        if req.finished():
            self.stats.counters["paths_inserted"] += int(st.namespace is not None)
            register_output(self, req, up_to)

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        st = state_of(req)
        key = id(req.kv)
        if st.row_plan is not None and st.row_plan.pending:
            release_tails(st.row_plan.tails)  # released before its pre-pass ran
        rec = self.diff.pop_row(key) if self.diff.rows else None
        plan = st.plan
        self.stats.note_release(plan.round if plan is not None else None, st.agent,
                                int(getattr(req.kv, "kv_allocated_len", 0) or 0),
                                float(plan.span_tokens) if plan is not None else 0.0,
                                st.master_runs(rec), self.diff.bytes_per_token)
        self.live_rows.release(req)
        st.release_row()

    # ================================================================== diagnostics

    def kv_bytes_by_agent(self) -> dict:
        """Agent -> KV bytes its live rows hold beyond the cached prefix (see :mod:`tokendance_sgl.accounting`)."""
        return self.stats.kv_bytes_by_agent(self.diff)

    def report(self) -> dict:
        """The tree's part of ``/tokendance/stats``."""
        diff_slots = self.diff.private_tokens()
        return {
            **self.store.stats(),
            "segment_only_tokens": self.segment_only_size(),
            "evictable": self.evictable_size(),
            "protected": self.protected_size(),
            "rows": len(self.diff.rows),
            "recompute_policy": str(self.policy),
            "diff_slots": diff_slots,
            "diff_pages": diff_slots // self.page_size,
            "cached_path_nodes_shifted": len(self.path_positions),
            **self.stats.report(self.diff.bytes_per_token),
        }

    def pretty_print(self):
        super().pretty_print()
        print(f"#segments: {len(self.store.segments())} (holding {self.store.n_holding}), segment-only tokens: "
              f"{self.segment_only_size()}, evictable={self.evictable_size()}, protected={self.protected_size()}")
        for s in self.store.segments():
            print("  ", s)

    def check_invariants(self) -> None:
        """Recomputes the page ledger from the radix tree, the segments and the live rows (AssertionError if not)."""
        nodes, stack = [], list(self.root_node.children.values())
        while stack:
            x = stack.pop()
            nodes.append(x)
            stack.extend(x.children.values())
            assert x.parent.children.get(x.key.child_key(self.page_size)) is x, f"node {x.id} is not its parent's child"
        seen = {id(x) for x in nodes}
        assert all(id(x) in seen for x in self.evictable_leaves), "an evictable leaf is not in the tree"
        check_ledger(self.ledger, self.radix_holds, [x for x in nodes if not x.evicted], self.store,
                     self.live_rows.held_pages())
        self.diff.check()
        self.check_slots()

    def check_slots(self) -> None:
        """The host's copies of the request rows equal the device's, and no page of the allocator's (host-kept) free
        list is one the tree holds (AssertionError if not)."""
        self.stats.counters["slot_checks"] += 1
        if self.row_mirror is not None:
            self.row_mirror.check(self.req_to_token_pool.req_to_token)
        free = self.pool.get_all_free_pages() if self.pool is not None else None
        if free is not None and len(free):
            pages = read_device(free, torch.int64)
            assert not self.ledger.held_mask(pages).any(), "a page the tree holds is in the free list"
