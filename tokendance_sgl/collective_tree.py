"""The collective tree: SGLang's radix cache plus shared *segment nodes* (the ``tokendance`` prefix-cache backend).

:class:`CollectiveTree` subclasses SGLang's :class:`~sglang.srt.mem_cache.radix_cache.RadixCache`. For ordinary
prefixes it *is* the radix cache: the same insert/match/split code, the same lock and eviction semantics, page
size 1 and > 1. On top of it, it keeps **segment nodes**: blocks of tokens (one agent's output of a round) that
later prompts contain at any position. A segment node is keyed by a content hash of its token ids and namespace
(:func:`tokendance_sgl.segments.content_hash`) and holds the master KV slots of its tokens, the row position its K
was rotated for (``anchor``), the round and agent that produced it, the number of request rows referencing it, a
lock count and its last access time.

Ownership rule (who frees a KV slot)
------------------------------------
The unit of ownership is the allocator page (a slot when ``page_size == 1``). A page handed out by the allocator
is owned by exactly one of:

* **the request row** that allocated it -- row positions ``[cache_protected_len, ...)`` -- minus the positions the
  row's :class:`~tokendance_sgl.diff_alloc.DiffAllocator` record marks as master references (slots of a segment,
  or the row's own tail page handed to a segment at registration). ``release_kv_cache`` frees them through
  :meth:`CollectiveTree.free_kv_row`, which skips master references;
* **the tree**, as one owner with several *holders*: radix nodes (a node holds the pages of its value) and segment
  nodes that *hold* their master pages. A per-page ledger counts the holders of every page: ``r`` radix nodes, ``s``
  holding segments, and how many of them are locked (``rl``, ``sl``). The tree frees a page exactly when its last
  holder lets go (radix eviction of the node, or dropping the segment), so a page shared by a radix node and a
  segment is freed once, by whichever goes last.

``evictable_size()`` and ``protected_size()`` count every tree-held page once (in tokens): protected if any holder
is locked, evictable otherwise. So ``allocator.available_size() + evictable_size() + protected_size()`` equals the
pool size whenever no request holds a row (SGLang's idle check). The stock counters ``evictable_size_`` and
``protected_size_`` still describe the radix part alone.

Kinds of segments
-----------------
* **strong** (a request with ``td_out_seg``): holds its master pages for its whole life, independently of the radix
  path that produced it. When the radix evicts the producer's prompt+output path, the output pages stay with the
  segment (they become segment-only pages). Strong segments are evicted by the round-aware policy.
* **weak** (plain requests, registered for detection when ``auto_register`` is on): refers to pages the radix tree
  holds, without holding them, so the memory behaviour of plain workloads is exactly stock. A weak segment is
  valid while none of its pages has been freed since registration (the ledger keeps a per-page generation
  counter); locking a weak segment makes it hold its pages until the last unlock.

A segment is *locked* while a live request row references it (``row_refs``) or a caller pinned it
(:meth:`CollectiveTree.lock_segment`); its pages are then protected and it is never evicted.

Registration (checkpoint of a finished, non-aborted request): the stock radix insert of prompt+output happens as in
``RadixCache``; then the output tokens become a segment. Its tokens are the request's output ids through the stop;
its master covers the output tokens whose KV exists (the KV of the last generated token is never computed: the row
holds ``origin_input_ids + output_ids[:-1]``); ``anchor`` is the row position of the first output token. A strong
segment also takes the request-owned tail of that range (the partial last page when ``page_size > 1``): the row's
record marks it as a transfer so ``release_kv_cache`` does not free it. If a segment with the same content already
holds valid KV, the id becomes an alias of it and nothing is taken.

Round-aware eviction (:meth:`CollectiveTree.evict`): (1) unlocked strong segments of *older rounds* -- produced
(or last named by a request) two or more rounds before the current one, i.e. not feeding the current round --
oldest round first, then least recently used; (2) radix leaves in SGLang's order (LRU by default); a radix page
still held by a strong or locked segment is not freed; (3) the remaining unlocked strong segments, least recently
used first. A segment is dropped only if that frees at least one page. ``reset()`` (``flush_cache``) drops every
node and segment without freeing (the scheduler clears the allocator afterwards).

Known ids (segment tables): the tree remembers every id ever registered (id -> content hash, length, namespace),
across evictions and flushes, and every id announced as ``td_out_seg`` by a request it has seen. A table naming an
id that is neither is refused ("unknown segment id"). A span naming a known id must hold a prefix of the
registered tokens (clients may drop trailing tokens, e.g. EOS): when the segment node is alive its tokens are
compared; when it was evicted and the span has the registered length, the content hash is compared. A provable
mismatch is never reused: by default the span is recomputed with a warning (status ``"mismatch"``); with
``strict_content`` (``TOKENDANCE_STRICT_SEGMENTS=1``) the request is refused ("segment does not match the
prompt"). A known id whose segment was evicted, is still pending, or lives in another namespace is not an error
either: the span is simply recomputed (``kv_len == 0`` in the plan).

:meth:`match_prefix` returns the radix prefix (as stock) and records on the request, as ``req.td_plan``
(:class:`SegmentPlan`), which registered segments its prompt contains (from the table, or by rolling-hash detection
when the request has no ``td_seg_*`` spans). With reuse on, the rows up to the end of the last resident segment are
offered as SGLang's "host hit" and :meth:`init_load_back` composes them from masters (:mod:`tokendance_sgl.reuse`):
re-rotated copies of a segment at another anchor are segment nodes of their own (key ``"<key>@<anchor>"``,
``copy_of`` set), strong and evicted like any segment. A malformed table never raises inside the
scheduler: the plan carries the error and the request proceeds without segments. :meth:`validate_request` gives
the same error for a request-receipt hook that fails the request with HTTP 400.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import time
from array import array
from dataclasses import dataclass, field
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
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from tokendance_sgl.collector import KVCollector
from tokendance_sgl.diff_alloc import BuiltRow, DiffAllocator, MasterRun
from tokendance_sgl.reuse import build_row, plan_layout
from tokendance_sgl.rope import RopeSpec
from tokendance_sgl.selection import DEFAULT_POLICY, parse_policy
from tokendance_sgl.segments import (
    DEFAULT_MIN_SEGMENT_LEN,
    SegmentDetector,
    SegmentTableError,
    content_hash,
    parse_segment_table,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TreeConfig",
    "SegmentNode",
    "PlannedSegment",
    "SegmentPlan",
    "CollectiveTree",
    "build_collective_tree",
    "SegmentUnavailable",
]


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return int(v)


@dataclass
class TreeConfig:
    """Settings of the collective tree (environment: ``TOKENDANCE_MIN_SEGMENT_LEN``, ``TOKENDANCE_AUTO_REGISTER``,
    ``TOKENDANCE_DETECT``, ``TOKENDANCE_MAX_WEAK_SEGMENTS``, ``TOKENDANCE_STRICT_SEGMENTS``, ``TOKENDANCE_REUSE``,
    ``TOKENDANCE_RECOMPUTE``, ``TOKENDANCE_BASE_ALIGN``, ``TOKENDANCE_MAX_GAP``)."""

    min_segment_len: int = DEFAULT_MIN_SEGMENT_LEN  # shortest segment detection can find
    auto_register: bool = True  # register outputs of plain finished requests as weak segments
    detect: bool = True  # rolling-hash detection for prompts without td_seg_* spans
    max_weak_segments: int = 4096  # weak segments hold no KV; this caps their token copies
    strict_content: bool = False  # a span whose tokens differ from its registered segment fails the request
    reuse: bool = True  # compose rows from masters (False: segments are tracked but every prompt is computed)
    recompute: str = DEFAULT_POLICY  # recompute policy (tokendance_sgl.selection)
    # a round's canonical base is rounded up to a multiple of this: > 1 leaves room for late arrivals with slightly
    # longer private parts, at the price of a hole of up to base_align - 1 positions for every agent (measured:
    # 16 cost teacher-forced top-1 0.905 -> 0.897 and KL 0.0117 -> 0.0134 on sink:4), so 1 by default
    base_align: int = 1
    max_gap: int = 64  # the largest position gap an agent accepts before it opens a base of its own

    @classmethod
    def from_env(cls, overrides: Optional[dict] = None) -> "TreeConfig":
        cfg = cls(
            min_segment_len=_env_int("TOKENDANCE_MIN_SEGMENT_LEN", DEFAULT_MIN_SEGMENT_LEN),
            auto_register=_env_bool("TOKENDANCE_AUTO_REGISTER", True),
            detect=_env_bool("TOKENDANCE_DETECT", True),
            max_weak_segments=_env_int("TOKENDANCE_MAX_WEAK_SEGMENTS", 4096),
            strict_content=_env_bool("TOKENDANCE_STRICT_SEGMENTS", False),
            reuse=_env_bool("TOKENDANCE_REUSE", True),
            recompute=os.environ.get("TOKENDANCE_RECOMPUTE") or DEFAULT_POLICY,
            base_align=_env_int("TOKENDANCE_BASE_ALIGN", 1),
            max_gap=_env_int("TOKENDANCE_MAX_GAP", 64),
        )
        for k, v in (overrides or {}).items():
            if not hasattr(cfg, k):
                continue
            if isinstance(getattr(cfg, k), bool) and isinstance(v, str):
                v = v.strip().lower() not in ("0", "false", "no", "off")
            setattr(cfg, k, type(getattr(cfg, k))(v))
        if cfg.min_segment_len < 1:
            raise ValueError("min_segment_len must be >= 1")
        parse_policy(cfg.recompute)  # a clear error at start-up
        if cfg.base_align < 1 or cfg.max_gap < 0:
            raise ValueError("base_align must be >= 1 and max_gap >= 0")
        return cfg


# Cumulative: composed rows; segment tokens read from masters / recomputed in context; text between segments computed
# by the pre-pass; private slots of composed regions; master copies made (and their tokens); load-backs refused.
# Collective steps run (rounds planned together), re-rotation kernel calls they made; probe forwards for deviation
# selection (tokens, tokens x layers), selections measured, selections reused from the round (no probe), positions
# turned private after a selection.
_COUNTERS = ("rows_composed", "reused_tokens", "recomputed_tokens", "prepass_text_tokens", "composed_private_slots",
             "master_copies", "rotated_tokens", "load_back_fallbacks", "collect_steps", "collect_copy_calls",
             "probe_tokens", "probe_token_layers", "selections", "selections_shared", "privatized_tokens")


_PREFILL_KEYS = ("extend_tokens", "prepass_tokens", "probe_tokens", "computed_tokens", "token_layers")


class SegmentUnavailable(RuntimeError):
    """The segment has no valid KV (evicted, weak and invalidated, or content-only)."""


@dataclass(eq=False)
class SegmentNode:
    key: str  # content hash of tokens + namespace
    tokens: array  # the segment's token ids (array('q'))
    ns_key: str
    anchor: int  # row position of tokens[0] in the row the master K was computed (rotated) for
    round: int
    agent: Optional[int]
    strong: bool
    master: Optional[torch.Tensor] = None  # slot of tokens[i] for i < kv_len (int64, tree device)
    pages: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    holding: bool = False  # counted in the page ledger as a holder of `pages`
    lock_ref: int = 0
    row_refs: int = 0  # live request rows referencing the master
    ids: set = field(default_factory=set)
    used_round: int = -1  # latest round of a request that named it
    hit_count: int = 0
    page_gens: Optional[np.ndarray] = None  # weak segments: ledger generations of `pages` at registration
    last_access_time: float = field(default_factory=time.monotonic)
    creation_time: float = field(default_factory=time.monotonic)
    copy_of: Optional[str] = None  # a re-rotated copy of segment `copy_of` at another anchor (key "<copy_of>@<anchor>")
    rows_served: int = 0  # request rows that have referenced the master (the agents sharing it)

    @property
    def kv_len(self) -> int:
        return 0 if self.master is None else int(self.master.numel())

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"SegmentNode(key={self.key[:8]}, ids={sorted(self.ids)}, len={len(self.tokens)}, kv_len={self.kv_len}, "
            f"anchor={self.anchor}, round={self.round}, agent={self.agent}, strong={self.strong}, "
            f"holding={self.holding}, lock_ref={self.lock_ref}, row_refs={self.row_refs})"
        )


@dataclass
class _IdRecord:
    key: str
    length: int
    ns_key: str
    round: int
    agent: Optional[int]


@dataclass
class PlannedSegment:
    start: int  # row positions [start, end) of the prompt
    end: int
    seg_id: Optional[str]
    key: Optional[str]  # content key of the segment node (None while pending)
    source: str  # "table" | "detected"
    status: str  # "resident" | "evicted" | "pending" | "other-namespace" | "mismatch"
    kv_len: int  # tokens of the span whose master KV is resident now (0: recompute all)
    anchor: Optional[int] = None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class SegmentPlan:
    round: Optional[int]
    agent: Optional[int]
    out_seg: Optional[str]
    ns_key: str
    source: str  # "table" | "detected" | "none"
    spans: list
    error: Optional[str]
    epoch: int
    prompt_len: int

    @property
    def reusable_tokens(self) -> int:
        return sum(s.kv_len for s in self.spans)


class _PageLedger:
    """Holders of every allocator page: ``r`` radix nodes, ``s`` holding segments, and the locked ones among them
    (``rl``, ``sl``). ``n_held``/``n_prot`` count the pages with any holder / any locked holder."""

    def __init__(self, n_pages: int, page_size: int):
        self.ps = page_size
        n = max(int(n_pages), 1)
        self.r = np.zeros(n, dtype=np.int32)
        self.rl = np.zeros(n, dtype=np.int32)
        self.s = np.zeros(n, dtype=np.int32)
        self.sl = np.zeros(n, dtype=np.int32)
        self.gen = np.zeros(n, dtype=np.int64)
        self.n_held = 0
        self.n_prot = 0

    def reset(self) -> None:
        for a in (self.r, self.rl, self.s, self.sl):
            a[:] = 0
        self.gen += 1  # nothing registered before the reset is valid afterwards
        self.n_held = 0
        self.n_prot = 0

    def _grow(self, max_page: int) -> None:
        n = len(self.r)
        if max_page < n:
            return
        new_n = max(max_page + 1, 2 * n)
        for name in ("r", "rl", "s", "sl", "gen"):
            old = getattr(self, name)
            a = np.zeros(new_n, dtype=old.dtype)
            a[:n] = old
            setattr(self, name, a)

    def ensure(self, pages: np.ndarray) -> None:
        if pages.size:
            self._grow(int(pages.max()))

    def held_mask(self, pages: np.ndarray) -> np.ndarray:
        return (self.r[pages] > 0) | (self.s[pages] > 0)

    def prot_mask(self, pages: np.ndarray) -> np.ndarray:
        return (self.rl[pages] > 0) | (self.sl[pages] > 0)

    def _change(self, pages: np.ndarray, arr_name: str, delta: int) -> np.ndarray:
        if pages.size == 0:
            return pages
        if pages.min() < 0:
            raise ValueError("negative page id")
        self._grow(int(pages.max()))
        arr = getattr(self, arr_name)
        u = pages if np.unique(pages).size == pages.size else np.unique(pages)
        h0, p0 = self.held_mask(u), self.prot_mask(u)
        np.add.at(arr, pages, delta)
        if delta < 0 and (arr[u] < 0).any():
            np.add.at(arr, pages, -delta)
            raise AssertionError(f"page ledger underflow in {arr_name}")
        h1, p1 = self.held_mask(u), self.prot_mask(u)
        self.n_held += int(h1.sum()) - int(h0.sum())
        self.n_prot += int(p1.sum()) - int(p0.sum())
        if delta < 0:
            freed = u[h0 & ~h1]
            if freed.size:
                self.gen[freed] += 1
            return freed
        return pages[:0]

    # radix holders
    def add_radix(self, pages):
        return self._change(pages, "r", 1)

    def release_radix(self, pages):
        return self._change(pages, "r", -1)

    def lock_radix(self, pages):
        return self._change(pages, "rl", 1)

    def unlock_radix(self, pages):
        return self._change(pages, "rl", -1)

    # segment holders
    def hold_seg(self, pages):
        return self._change(pages, "s", 1)

    def release_seg(self, pages):
        return self._change(pages, "s", -1)

    def lock_seg(self, pages):
        return self._change(pages, "sl", 1)

    def unlock_seg(self, pages):
        return self._change(pages, "sl", -1)

    def exclusive_seg_pages(self, pages: np.ndarray) -> int:
        """Pages that dropping one unlocked holding segment of ``pages`` would free."""
        if pages.size == 0:
            return 0
        return int(((self.r[pages] == 0) & (self.s[pages] == 1) & (self.sl[pages] == 0)).sum())


def pool_bytes_per_token(allocator: Any) -> float:
    """K+V bytes of one token over all layers: the KV pool's size divided by its slots (0.0 if unknown)."""
    try:
        kv = allocator.get_kvcache()
        k, v = kv.get_kv_size_bytes()
        rows = int(kv.size) + int(getattr(kv, "page_size", 1))
        return float(k + v) / rows if rows > 0 else 0.0
    except Exception:
        return 0.0


def _is_prefix(part: Sequence[int], whole: array) -> bool:
    n = len(part)
    if not isinstance(part, array):
        part = array("q", part)
    return 0 < n <= len(whole) and part == whole[:n]


class CollectiveTree(RadixCache):
    """SGLang's radix cache plus segment nodes with round-aware eviction and exact page accounting.

    See the module docstring for the ownership rule. ``config`` defaults to :meth:`TreeConfig.from_env`.
    ``copy_fn(src, dst)`` copies K/V of pool slots (copy-on-write pages, ``page_size > 1``); by default it uses
    :func:`tokendance_sgl.kernels.copy_kv_slots` on the allocator's KV pool. ``bytes_per_token`` (K+V bytes of one
    token over all layers) defaults to the pool's size.
    """

    def __init__(
        self,
        params: CacheInitParams,
        config: Optional[TreeConfig] = None,
        *,
        copy_fn: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
        bytes_per_token: Optional[float] = None,
    ):
        self.config = config if config is not None else TreeConfig.from_env()
        self._copy_fn_override = copy_fn
        self._ids: dict[str, _IdRecord] = {}  # every id ever registered (survives eviction and reset)
        self._pending_ids: dict[str, Optional[int]] = {}  # td_out_seg announced by requests not yet registered
        self.current_round = 0
        self._seg_epoch = 0
        self._ledger: Optional[_PageLedger] = None
        self.policy = parse_policy(self.config.recompute)
        self.collector = KVCollector(self)
        self.rope: Optional[RopeSpec] = None  # set by build_collective_tree from the loaded model
        self.num_layers = 0  # set by build_collective_tree (prefill work per layer)
        self.counters = {k: 0 for k in _COUNTERS}
        self.cum_bytes_by_agent: dict = {}
        self.prefill_by_round: dict = {}  # round -> tokens computed (extend, pre-pass, probe) and token-layers
        self.kv_by_round: dict = {}  # round -> [rows released, token-equivalents they held, shared-region
        # tokens of those rows, token-equivalents held for the shared region]
        super().__init__(params)  # calls reset()
        self.diff = DiffAllocator(
            self.token_to_kv_pool_allocator,
            page_size=self.page_size,
            bytes_per_token=bytes_per_token if bytes_per_token is not None else self._pool_bytes_per_token(),
            copy_fn=copy_fn if copy_fn is not None else self._pool_copy,
            alloc_fn=self._alloc_slots,
        )

    # ================================================================== lifecycle

    def reset(self):
        super().reset()
        if self._ledger is None:
            self._ledger = _PageLedger(self._initial_pages(), self.page_size)
        else:
            self._ledger.reset()
        self._segments: dict[str, SegmentNode] = {}
        self._n_holding = 0
        self._detector = SegmentDetector(min_len=self.config.min_segment_len)
        self._seg_epoch += 1
        self.collector.reset()
        if hasattr(self, "kv_by_round"):  # per-round statistics restart with the cache (a flush starts a new run)
            self.kv_by_round.clear()
            self.prefill_by_round.clear()
        if hasattr(self, "diff"):
            self.diff.clear()

    def _initial_pages(self) -> int:
        alloc = self.token_to_kv_pool_allocator
        size = getattr(alloc, "size", None) if alloc is not None else None
        if not size:
            return 1024
        return int(size) // self.page_size + 2

    # ================================================================== helpers

    def _node_pages(self, node: TreeNode) -> np.ndarray:
        v = node.value
        cached = getattr(node, "_td_pages", None)
        if cached is not None and getattr(node, "_td_pages_src", None) is v:
            return cached
        if v is None or isinstance(v, list) or v.numel() == 0:
            pages = np.empty(0, dtype=np.int64)
        else:
            vc = v.detach().to("cpu", torch.int64).numpy()
            ps = self.page_size
            if ps == 1:
                pages = vc.copy()
            elif vc.size % ps == 0 and (vc[::ps] % ps == 0).all():
                pages = vc[::ps] // ps
            else:  # not page-structured (e.g. simulated values): fall back to the distinct pages
                pages = np.unique(vc // ps)
        node._td_pages = pages
        node._td_pages_src = v
        return pages

    def _slot_pages(self, slots: torch.Tensor) -> np.ndarray:
        if slots is None or slots.numel() == 0:
            return np.empty(0, dtype=np.int64)
        return np.unique(slots.detach().to("cpu", torch.int64).numpy() // self.page_size)

    def _free_pages(self, pages: np.ndarray) -> None:
        if pages.size == 0:
            return
        alloc = self.token_to_kv_pool_allocator
        if alloc is None:
            return
        ps = self.page_size
        if ps == 1:
            slots = torch.from_numpy(pages.astype(np.int64))
        else:
            slots = torch.from_numpy((pages[:, None] * ps + np.arange(ps)[None, :]).reshape(-1).astype(np.int64))
        alloc.free(slots.to(self.device))

    def _alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        """Allocation for composed rows: evict like SGLang's ``alloc_token_slots`` does, then allocate."""
        alloc = self.token_to_kv_pool_allocator
        alloc.evict_to_free_tokens(self, n)
        return alloc.alloc(n)

    def _pool_bytes_per_token(self) -> float:
        return pool_bytes_per_token(self.token_to_kv_pool_allocator)

    def _pool_copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        kv = self.token_to_kv_pool_allocator.get_kvcache() if self.token_to_kv_pool_allocator is not None else None
        if kv is None or not hasattr(kv, "k_buffer"):
            raise RuntimeError("copy-on-write needs a KV pool with k_buffer/v_buffer (or pass copy_fn)")
        from tokendance_sgl.kernels import copy_kv_slots

        copy_kv_slots(kv.k_buffer, kv.v_buffer, src, dst)

    @staticmethod
    def _ns_key(req: Any, td_ns: str = "") -> str:
        """Namespace of a request's segments: ``td_ns`` alone (so a client can compute
        ``content_hash(tokens, td_ns)`` itself), extended with the request's ``extra_key`` (LoRA) and ``cache_salt``
        when it has them, because those change the KV."""
        extra, salt = getattr(req, "extra_key", None), getattr(req, "cache_salt", None)
        if extra is None and salt is None:
            return td_ns or ""
        return json.dumps([td_ns or "", extra, salt], default=str)

    def _note_round(self, rnd: Optional[int]) -> None:
        if rnd is not None and rnd > self.current_round:
            self.current_round = int(rnd)

    def new_round(self, rnd: Optional[int] = None) -> int:
        """Advances the current round (to ``rnd``, or by one). Rounds also advance from the requests' ``td_round``."""
        self.current_round = self.current_round + 1 if rnd is None else max(self.current_round, int(rnd))
        return self.current_round

    def _is_stale(self, seg: SegmentNode) -> bool:
        return max(seg.round, seg.used_round) + 1 < self.current_round

    # ================================================================== accounting

    def evictable_size(self):
        if self.disable:
            return 0
        return (self._ledger.n_held - self._ledger.n_prot) * self.page_size

    def protected_size(self):
        if self.disable:
            return 0
        return self._ledger.n_prot * self.page_size

    def total_size(self):
        seg_only = 0
        if self._n_holding:
            L = self._ledger
            seg_only = int(((L.r == 0) & (L.s > 0)).sum()) * self.page_size
        return super().total_size() + seg_only

    def segment_only_size(self) -> int:
        L = self._ledger
        return int(((L.r == 0) & (L.s > 0)).sum()) * self.page_size

    # ================================================================== radix overrides (ledger bookkeeping)

    def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
        before = self.evictable_size_
        prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
        if self.evictable_size_ != before:  # the stock helper created exactly one new leaf: `last`
            self._ledger.add_radix(self._node_pages(last))
        return prefix_len, last

    def _split_node(self, key, child, split_len):
        pages = self._node_pages(child)
        n_before = len(child.value)
        new_node = super()._split_node(key, child, split_len)
        ps = self.page_size
        if pages.size * ps == n_before:  # page-structured value: the pages split with it
            k = split_len // ps
            new_node._td_pages, new_node._td_pages_src = pages[:k], new_node.value
            child._td_pages, child._td_pages_src = pages[k:], child.value
        return new_node

    def inc_lock_ref(self, node: TreeNode) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        turning = []
        n = node
        while n is not self.root_node and n is not None:
            if n.lock_ref == 0:
                turning.append(n)
            n = n.parent
        ev0 = self.evictable_size()
        super().inc_lock_ref(node)
        for n in turning:
            self._ledger.lock_radix(self._node_pages(n))
        return IncLockRefResult(delta=self.evictable_size() - ev0)

    def dec_lock_ref(self, node: TreeNode, params: Optional[DecLockRefParams] = None) -> DecLockRefResult:
        if self.disable:
            return DecLockRefResult(delta=0)
        turning = []
        n = node
        while n is not self.root_node and n is not None:
            if n.lock_ref == 1:
                turning.append(n)
            n = n.parent
        ev0 = self.evictable_size()
        super().dec_lock_ref(node, params)
        for n in turning:
            self._ledger.unlock_radix(self._node_pages(n))
        return DecLockRefResult(delta=self.evictable_size() - ev0)

    # ================================================================== eviction

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        t0 = time.perf_counter()
        want = int(params.num_tokens)
        got = 0
        if want > 0 and self._n_holding:
            got += self._evict_segments(want - got, stale_only=True)
        if got < want:
            got += self._evict_radix(want - got)
        if got < want and self._n_holding:
            got += self._evict_segments(want - got, stale_only=False)
        self.update_eviction_metrics(got, t0)
        return EvictResult(num_tokens_evicted=got)

    def _evict_radix(self, want: int) -> int:
        heap = [(self.eviction_strategy.get_priority(x), x) for x in self.evictable_leaves]
        heapq.heapify(heap)
        got = 0
        alloc = self.token_to_kv_pool_allocator
        while got < want and heap:
            _, x = heapq.heappop(heap)
            pages = self._node_pages(x)
            freed = self._ledger.release_radix(pages)
            if freed.size == pages.size and pages.size:
                alloc.free_segment(x.value, start_pos=0)  # nothing else held it: exactly the stock free
            elif freed.size:
                self._free_pages(freed)
            got += int(freed.size) * self.page_size
            self._delete_leaf(x)
            if len(x.parent.children) == 0 and x.parent.lock_ref == 0:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(x.parent), x.parent))
            self.kv_events.record_remove(x)
        return got

    def _evict_segments(self, want: int, *, stale_only: bool) -> int:
        cands = [
            s
            for s in self._segments.values()
            if s.holding and s.lock_ref == 0 and (not stale_only or self._is_stale(s))
        ]
        if not cands:
            return 0
        cands.sort(key=lambda s: (not self._is_stale(s), max(s.round, s.used_round), s.last_access_time))
        got = 0
        for s in cands:
            if got >= want:
                break
            if self._ledger.exclusive_seg_pages(s.pages) == 0:
                continue
            got += self._drop_segment(s)
        return got

    # ================================================================== segments: registry

    def segments(self) -> list[SegmentNode]:
        return list(self._segments.values())

    def segment(self, key: str) -> Optional[SegmentNode]:
        return self._segments.get(key)

    def segment_for_id(self, seg_id: str) -> Optional[SegmentNode]:
        rec = self._ids.get(seg_id)
        return None if rec is None else self._segments.get(rec.key)

    def known_id(self, seg_id: str) -> bool:
        return seg_id in self._ids or seg_id in self._pending_ids

    def _weak_valid(self, seg: SegmentNode) -> bool:
        if seg.master is None:
            return False
        if seg.holding:
            return True
        return seg.page_gens is not None and np.array_equal(self._ledger.gen[seg.pages], seg.page_gens)

    def has_kv(self, seg: SegmentNode) -> bool:
        """Whether ``seg`` has valid master KV now."""
        return self._weak_valid(seg)

    def _record_id(self, seg_id: Optional[str], seg: SegmentNode) -> None:
        if not seg_id:
            return
        old = self._ids.get(seg_id)
        if old is not None and old.key != seg.key:
            logger.warning("segment id %r re-registered with different content; the latest wins", seg_id)
        self._ids[seg_id] = _IdRecord(seg.key, len(seg.tokens), seg.ns_key, seg.round, seg.agent)
        self._pending_ids.pop(seg_id, None)
        seg.ids.add(seg_id)

    def register_segment(
        self,
        tokens: Sequence[int],
        master_slots: Optional[torch.Tensor],
        *,
        anchor: int,
        round: Optional[int] = None,
        agent: Optional[int] = None,
        seg_id: Optional[str] = None,
        ns_key: str = "",
        strong: bool = True,
    ) -> Optional[SegmentNode]:
        """Registers ``tokens`` as a segment whose first ``len(master_slots)`` tokens have KV in ``master_slots``.

        A strong segment starts holding the pages of ``master_slots`` (they must be pages the tree already holds, or
        pages the caller hands over and will not free). A weak segment needs pages the tree holds. If a segment with
        the same content already has valid KV, ``seg_id`` becomes an alias of it and ``master_slots`` are not taken.
        Returns the segment node (None if a weak registration was refused)."""
        node, _ = self._register(tokens, master_slots, anchor=anchor, round=round, agent=agent, seg_id=seg_id,
                                 ns_key=ns_key, strong=strong)
        return node

    def _register(self, tokens, master_slots, *, anchor, round, agent, seg_id, ns_key, strong):
        toks = tokens if isinstance(tokens, array) and tokens.typecode == "q" else array("q", tokens)
        toks = array("q", toks)  # own copy
        if len(toks) == 0:
            raise ValueError("a segment needs at least one token")
        key = content_hash(toks, ns_key)
        rnd = self.current_round if round is None else int(round)
        self._note_round(rnd)
        master = None
        if master_slots is not None and master_slots.numel() > 0:
            if master_slots.numel() > len(toks):
                raise ValueError(f"{master_slots.numel()} master slots for {len(toks)} tokens")
            master = master_slots.detach().to(device=self.device, dtype=torch.int64).clone()

        existing = self._segments.get(key)
        if existing is not None:
            if self._weak_valid(existing) or master is None:
                existing.round = max(existing.round, rnd)
                existing.last_access_time = time.monotonic()
                if strong and not existing.strong:
                    self._make_strong(existing)
                self._record_id(seg_id, existing)
                self._seg_epoch += 1
                return existing, False
            if existing.lock_ref > 0:  # cannot happen: a locked segment holds valid KV
                raise AssertionError(f"locked segment without KV: {existing!r}")
            self._drop_segment(existing)

        pages = self._slot_pages(master) if master is not None else np.empty(0, dtype=np.int64)
        if master is not None and not strong:
            self._ledger.ensure(pages)
            if not self._ledger.held_mask(pages).all():
                logger.debug("weak segment refused: its pages are not held by the tree")
                return None, False
        node = SegmentNode(key=key, tokens=toks, ns_key=ns_key, anchor=int(anchor), round=rnd, agent=agent,
                           strong=bool(strong), master=master, pages=pages)
        if master is not None:
            if strong:
                self._ledger.hold_seg(pages)
                node.holding = True
                self._n_holding += 1
            else:
                node.page_gens = self._ledger.gen[pages].copy()
        self._segments[key] = node
        self._detector.add(key, toks, ns_key)
        self._record_id(seg_id, node)
        self._seg_epoch += 1
        if not strong:
            self._enforce_weak_cap()
        return node, master is not None

    def _make_strong(self, seg: SegmentNode) -> None:
        seg.strong = True
        if seg.master is not None and not seg.holding:
            self._ledger.hold_seg(seg.pages)
            seg.holding = True
            self._n_holding += 1

    def _enforce_weak_cap(self) -> None:
        weak = [s for s in self._segments.values() if not s.strong and s.lock_ref == 0]
        excess = len(weak) - self.config.max_weak_segments
        if excess > 0:
            weak.sort(key=lambda s: s.last_access_time)
            for s in weak[:excess]:
                self._drop_segment(s)

    def _drop_segment(self, seg: SegmentNode) -> int:
        """Removes ``seg``; frees its pages no other holder keeps. Returns the tokens freed."""
        if seg.lock_ref > 0:
            raise RuntimeError(f"cannot drop a locked segment: {seg!r}")
        if self._segments.get(seg.key) is seg:
            del self._segments[seg.key]
            self._detector.remove(seg.key)
        freed_tokens = 0
        if seg.holding:
            freed = self._ledger.release_seg(seg.pages)
            self._free_pages(freed)
            freed_tokens = int(freed.size) * self.page_size
            seg.holding = False
            self._n_holding -= 1
        seg.master = None
        seg.pages = np.empty(0, dtype=np.int64)
        seg.page_gens = None
        self._seg_epoch += 1
        return freed_tokens

    def drop_segment(self, seg: SegmentNode) -> int:
        """Evicts one unlocked segment now (frees the pages only it held); returns the tokens freed."""
        return self._drop_segment(seg)

    # ================================================================== segments: locks and masters

    def lock_segment(self, seg: SegmentNode) -> None:
        """Pins ``seg``: its master pages become protected and it cannot be evicted. Raises
        :class:`SegmentUnavailable` when it has no valid KV."""
        if self._segments.get(seg.key) is not seg or not self._weak_valid(seg):
            raise SegmentUnavailable(f"segment has no valid KV: {seg!r}")
        if not seg.holding:  # weak: hold while locked
            self._ledger.hold_seg(seg.pages)
            seg.holding = True
            self._n_holding += 1
        if seg.lock_ref == 0:
            self._ledger.lock_seg(seg.pages)
        seg.lock_ref += 1
        seg.last_access_time = time.monotonic()

    def unlock_segment(self, seg: SegmentNode) -> None:
        if seg.lock_ref <= 0:
            raise RuntimeError(f"unlock of an unlocked segment: {seg!r}")
        seg.lock_ref -= 1
        if self._segments.get(seg.key) is not seg:
            seg.holding = False  # dropped by reset(): the (fresh) ledger does not know it
            return
        if seg.lock_ref > 0:
            return
        self._ledger.unlock_seg(seg.pages)
        if not seg.strong and seg.holding:
            freed = self._ledger.release_seg(seg.pages)
            self._free_pages(freed)
            seg.holding = False
            self._n_holding -= 1
            if freed.size:  # its pages died with it: the weak segment has no KV any more
                self._drop_segment(seg)
            else:
                seg.page_gens = self._ledger.gen[seg.pages].copy()

    def set_master(self, seg: SegmentNode, slots: torch.Tensor, *, anchor: int) -> None:
        """Replaces ``seg``'s master by ``slots`` (freshly allocated pages the caller hands over, e.g. a copy of the
        master re-rotated to a canonical position ``anchor``). The old master pages are released (freed if no other
        holder keeps them). The segment becomes strong. Requires an unlocked segment."""
        if seg.lock_ref > 0:
            raise RuntimeError("set_master needs an unlocked segment (rows still reference the old master)")
        if self._segments.get(seg.key) is not seg:
            raise SegmentUnavailable("segment is not registered")
        if slots.numel() > len(seg.tokens) or slots.numel() == 0:
            raise ValueError("bad master length")
        new = slots.detach().to(self.device, torch.int64).clone()
        new_pages = self._slot_pages(new)
        self._ledger.hold_seg(new_pages)
        if seg.holding:
            freed = self._ledger.release_seg(seg.pages)
            self._free_pages(freed)
        else:
            self._n_holding += 1
        seg.master, seg.pages, seg.anchor = new, new_pages, int(anchor)
        seg.holding, seg.strong, seg.page_gens = True, True, None
        self._seg_epoch += 1

    # ================================================================== request rows

    def compose_row(
        self, req: Any, start_pos: int, pieces: Sequence[Any], *, agent: Optional[int] = None
    ) -> Optional[BuiltRow]:
        """Builds the slots of ``req``'s row positions ``[start_pos, ...)`` from master runs
        (:class:`~tokendance_sgl.diff_alloc.MasterRun` with ``seg`` a :class:`SegmentNode`) and new runs, via the
        diff allocator. Referenced segments are locked for the life of the row (released by :meth:`on_release`).
        Returns None when the pool cannot provide the private slots (nothing changed)."""
        kv = req.kv
        key = id(kv)
        rec = self.diff.record(key)
        already = {id(s) for s in rec.segs(locked_only=True)} if rec is not None else set()
        pinned = []
        for p in pieces:
            if isinstance(p, MasterRun) and len(p) and id(p.seg) not in already and all(p.seg is not q for q in pinned):
                self.lock_segment(p.seg)  # before allocating: allocation may evict
                pinned.append(p.seg)
        built = None
        try:
            built = self.diff.build_row(key, start_pos, pieces, agent=agent, owner=kv)
        finally:
            used = {id(s) for s in built.segs} if built is not None else set()
            for s in pinned:
                if id(s) in used:
                    s.row_refs += 1
                    s.rows_served += 1
                else:
                    self.unlock_segment(s)
        return built

    def _release_row_ref(self, seg: SegmentNode) -> None:
        seg.row_refs -= 1
        self.unlock_segment(seg)

    def free_kv_row(self, kv: Any, ranges: list[tuple[int, int]]) -> None:
        rec = self.diff.record(id(kv)) if self.diff.rows else None
        if rec is None or not rec.refs:
            return super().free_kv_row(kv, ranges)
        row = self.req_to_token_pool.req_to_token[kv.req_pool_idx]
        self.diff.free_owned(id(kv), row, ranges)

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        req.td_host_slots = None
        req.td_row_plan = None
        rec = self.diff.record(id(req.kv)) if self.diff.rows else None
        self._note_row_kv(req, rec)
        if rec is not None:
            self._refresh_private_tokens()
            toks = self.diff.row_kv_tokens().get(id(req.kv), 0.0)
            self.cum_bytes_by_agent[rec.agent] = self.cum_bytes_by_agent.get(rec.agent, 0.0) + (
                toks * self.diff.bytes_per_token
            )
            self.diff.pop_row(id(req.kv))
            for seg in rec.segs(locked_only=True):
                self._release_row_ref(seg)

    def _note_row_kv(self, req: Any, rec: Any) -> None:
        """KV per agent (DESIGN.md 6): the slots the released row held for its prompt and output, master slots
        divided among the rows that shared them, accumulated per round."""
        plan = getattr(req, "td_plan", None)
        rnd = plan.round if plan is not None and plan.round is not None else -1  # -1: requests without a round
        total = int(getattr(req.kv, "kv_allocated_len", 0) or 0)
        if total <= 0:
            return
        # the shared region: the row's segment spans; every span token is a slot of the row except the master
        # slots it reads, which count as 1/rows_served each (diff-aware storage of the shared blocks)
        shared = float(sum(s.end - s.start for s in plan.spans)) if plan is not None else 0.0
        saved = 0.0
        if rec is not None:
            for r in rec.refs:
                if r.locked:
                    saved += len(r) * (1.0 - 1.0 / max(1, r.seg.rows_served))
        acc = self.kv_by_round.setdefault(int(rnd), [0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += float(total) - saved
        acc[2] += shared
        acc[3] += shared - saved

    def note_prefill(self, rnd: Optional[int], *, extend: int = 0, prepass: int = 0, probe: int = 0,
                     probe_token_layers: int = 0) -> None:
        """Prefill work of one forward for a round's requests (tokens and tokens x layers)."""
        d = self.prefill_by_round.setdefault(-1 if rnd is None else int(rnd), dict.fromkeys(_PREFILL_KEYS, 0))
        d["extend_tokens"] += extend
        d["prepass_tokens"] += prepass
        d["probe_tokens"] += probe
        d["computed_tokens"] += extend + prepass
        d["token_layers"] += (extend + prepass) * self.num_layers + probe_token_layers

    def row_master_positions(self, req: Any) -> np.ndarray:
        rec = self.diff.record(id(req.kv))
        return np.empty(0, dtype=np.int64) if rec is None else rec.master_positions()

    def kv_bytes_by_agent(self) -> dict:
        """Agent -> KV bytes its live rows hold beyond the radix prefix: master bytes divided among the rows sharing
        them plus the rows' own (diff/new) slots."""
        self._refresh_private_tokens()
        return self.diff.kv_bytes_by_agent()

    def _refresh_private_tokens(self) -> None:
        ps = self.page_size
        for key, rec in self.diff.rows.items():
            kv = rec.owner
            if kv is None or not getattr(kv, "kv_allocated_len", 0):
                continue
            alloc_len = -(-kv.kv_allocated_len // ps) * ps
            own = alloc_len - kv.cache_protected_len - int(
                (rec.master_positions() >= kv.cache_protected_len).sum()
            )
            rec.private_tokens = max(0, own)

    # ================================================================== checkpoint / registration

    def _insert_cache(self, req, token_ids, *, key_limit=None, split_prompt=False):
        """As ``RadixCache._insert_cache`` (insert the page-aligned key, split at the prompt boundary), but the
        duplicates the insert exposed go back through :meth:`free_kv_row`, so master references are never freed."""
        kv_indices = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, : len(token_ids)]
        radix_key = RadixKey(token_ids, req.extra_key, is_bigram=self.is_eagle, cache_salt=req.cache_salt).page_aligned(
            self.page_size
        )
        plan = getattr(req, "td_row_plan", None)
        if plan is not None and plan.exact_len is not None:
            # Rows from exact_len on hold reused (approximate or position-shifted) KV: never offered as a prefix.
            exact = max(req.kv.cache_protected_len, plan.exact_len // self.page_size * self.page_size)
            key_limit = exact if key_limit is None else min(key_limit, exact)
        if key_limit is not None:
            radix_key = radix_key[:key_limit]
        key_len = len(radix_key)
        values = kv_indices[:key_len].to(dtype=torch.int64, copy=True)
        priority = req.priority or 0
        result = self.insert(
            InsertParams(key=radix_key, value=values, inserted_len=req.kv.cache_inserted_len, priority=priority)
        )
        req.kv.cache_inserted_len = max(req.kv.cache_inserted_len, key_len)
        if split_prompt:
            prompt_key = RadixKey(
                token_ids[: len(req.origin_input_ids)], req.extra_key, is_bigram=self.is_eagle,
                cache_salt=req.cache_salt,
            ).page_aligned(self.page_size)
            if 0 < len(prompt_key) < key_len:
                self.insert(
                    InsertParams(
                        key=prompt_key,
                        value=values[: len(prompt_key)],
                        inserted_len=len(prompt_key),
                        priority=min(priority + 1, torch.iinfo(torch.int64).max),
                    )
                )
        if result.prefix_len > req.kv.cache_protected_len:
            self.free_kv_row(req.kv, [(req.kv.cache_protected_len, result.prefix_len)])
        return radix_key, kv_indices, result.prefix_len

    def checkpoint(self, req: Any, *, up_to: int):
        if self.disable:
            return
        super().checkpoint(req, up_to=up_to)
        if self.diff.rows and self.diff.record(id(req.kv)) is not None:
            for seg in self.diff.trim_below(id(req.kv), req.kv.cache_protected_len):
                self._release_row_ref(seg)
        if req.finished():
            self._register_output(req, up_to)

    def _register_output(self, req: Any, up_to: int) -> Optional[SegmentNode]:
        if type(getattr(req, "finished_reason", None)).__name__ == "FINISH_ABORT":
            return None
        out = getattr(req, "output_ids_through_stop", None)
        if out is None:
            out = req.output_ids
        if len(out) == 0:
            return None
        try:
            table = parse_segment_table(getattr(req.sampling_params, "custom_params", None), None)
        except SegmentTableError as e:
            logger.warning("request %s: ignoring its segment table at registration: %s", getattr(req, "rid", "?"), e)
            table = None
        out_seg = table.out_seg if table is not None else None
        strong = out_seg is not None
        if not strong and (not self.config.auto_register or len(out) < self.config.min_segment_len):
            return None
        ns_key = self._ns_key(req, table.ns if table is not None else "")
        kv_start = len(req.origin_input_ids)
        kv_end = min(int(up_to), kv_start + len(out))
        cpl = req.kv.cache_protected_len
        if not strong:
            kv_end = min(kv_end, cpl)
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        master = row[kv_start:kv_end].to(torch.int64) if kv_end > kv_start else None
        if master is None and not strong:
            return None
        plan = getattr(req, "td_row_plan", None)
        node, adopted = self._register(
            array("q", out), master, anchor=plan.position_of(kv_start) if plan is not None else kv_start,
            round=table.round if table is not None else None,
            agent=table.agent if table is not None else None,
            seg_id=out_seg, ns_key=ns_key, strong=strong,
        )
        if node is not None and adopted and kv_end > cpl:
            # The request-owned tail of the master (the partial last page) now belongs to the segment.
            t0 = max(cpl, kv_start)
            t0 -= t0 % self.page_size
            self.diff.add_master_ref(id(req.kv), t0, kv_end, node, row[t0:kv_end], locked=False, owner=req.kv)
        if node is not None:
            req.td_registered = node.key
        return node

    # ================================================================== planning

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        res = super().match_prefix(params)
        req = params.req
        if req is not None and not self.disable:
            try:
                self.plan_for(req)
                lay = None
                if self.config.reuse and not getattr(getattr(req, "kv", None), "holds_kv", False):
                    lay = plan_layout(self, req, res.device_prefix_len, len(params.key))
                req.td_layout = lay
                if lay is not None:
                    # The segment region is offered as a "host hit": PrefillAdder budgets it, then init_load_back
                    # composes the row.
                    res = res._replace(host_hit_length=lay.end - lay.start)
            except Exception:  # planning is advisory; never take the scheduler down
                logger.exception("tokendance: segment planning failed for request %s", getattr(req, "rid", "?"))
        return res

    def init_load_back(self, params: InitLoadBackParams):
        """Composes the request's segment region (``tokendance_sgl.reuse.build_row``). All promised tokens or none:
        0 makes SGLang prefill the request normally."""
        req = params.req
        node = req.last_node if req is not None else params.best_match_node
        lay = getattr(req, "td_layout", None) if req is not None else None
        if lay is None or lay.start != req.prefix_len or lay.end - lay.start != params.host_hit_length:
            return 0, node
        try:
            out = self.build_row(req, lay)
        except Exception:
            logger.exception("tokendance: composing the row of request %s failed; prefilling it normally", req.rid)
            out = None
        if out is None:
            self.counters["load_back_fallbacks"] += 1
            return 0, node
        req.td_host_slots, req.td_row_plan = out
        c = self.counters
        c["rows_composed"] += 1
        c["reused_tokens"] += lay.stats["reused"]
        c["recomputed_tokens"] += lay.stats["recomputed"]
        c["prepass_text_tokens"] += lay.stats["text"]
        c["composed_private_slots"] += lay.stats["private_slots"]
        return lay.end - lay.start, node

    def build_row(self, req: Any, lay: Any):
        """Composes ``req``'s reused region (:func:`tokendance_sgl.reuse.build_row`; the ``pic`` backend overrides)."""
        return build_row(self, req, lay)

    def load_back_is_cache_owned(self) -> bool:
        return False  # the composed region is the request's (minus its master references, see free_kv_row)

    def prefix_device_indices(self, req: Any) -> torch.Tensor:
        extra = getattr(req, "td_host_slots", None)
        if extra is None:
            return super().prefix_device_indices(req)
        r = req.prefix_len - int(extra.numel())
        path = self.path_device_indices(req.last_node)[:r] if r > 0 else extra[:0]
        return torch.cat([path.to(device=extra.device, dtype=torch.int64), extra.to(torch.int64)])

    def master_at(self, seg: Optional[SegmentNode], anchor: int, pinned: list) -> Optional[SegmentNode]:
        """``seg``'s master K rotated for row position ``anchor`` (see :meth:`master_copies`)."""
        return self.master_copies([(seg, anchor)], pinned)[0]

    def master_copies(self, wants: Sequence[tuple[Optional[SegmentNode], int]], pinned: list) -> list:
        """For every ``(segment, anchor)``: the segment's master K rotated for row position ``anchor`` -- the segment
        itself, or its copy at that anchor (key ``"<key>@<anchor>"``). The copies that do not exist yet are made
        together: one allocation and ONE batched copy + re-rotation call for all of them. Returned nodes (and the
        sources of new copies) are locked and appended to ``pinned``; the caller unlocks them. An entry is None when
        the segment has no KV or the pool has no room."""
        out: list = [None] * len(wants)
        todo: dict[str, tuple[SegmentNode, int, list]] = {}
        for i, (seg, anchor) in enumerate(wants):
            if seg is None or not self.has_kv(seg):
                continue
            if seg.copy_of is None and seg.anchor == anchor:
                self.lock_segment(seg)
                pinned.append(seg)
                out[i] = seg
                continue
            key = f"{seg.copy_of or seg.key}@{anchor}"
            node = self._segments.get(key)
            if node is not None and self.has_kv(node) and node.kv_len >= seg.kv_len:
                node.round = max(node.round, self.current_round)
                self.lock_segment(node)
                pinned.append(node)
                out[i] = node
            elif key in todo:
                todo[key][2].append(i)
            else:
                todo[key] = (seg, int(anchor), [i])
        if not todo:
            return out
        if self.rope is None:
            raise RuntimeError("re-rotation needs the model's RoPE spec (CollectiveTree.rope is not set)")
        for seg, _, _ in todo.values():
            self.lock_segment(seg)  # allocation below may evict
            pinned.append(seg)
        sizes = [seg.kv_len for seg, _, _ in todo.values()]
        slots = self._alloc_slots(sum(sizes))
        if slots is None:
            return out
        slots = slots.to(torch.int64)
        from tokendance_sgl.kernels import copy_rerotate_k

        kv = self.token_to_kv_pool_allocator.get_kvcache()
        src = torch.cat([seg.master for seg, _, _ in todo.values()])
        delta = torch.cat([torch.full((n,), anchor - seg.anchor, dtype=torch.int64)
                           for n, (seg, anchor, _) in zip(sizes, todo.values())]).to(slots.device)
        copy_rerotate_k(kv.k_buffer, kv.v_buffer, src, slots, delta, **self.rope.kernel_kwargs())
        for (key, (seg, anchor, idx)), part in zip(todo.items(), torch.split(slots, sizes)):
            stale = self._segments.get(key)
            if stale is not None and stale.lock_ref == 0:
                self._drop_segment(stale)
            node = SegmentNode(key=key, tokens=seg.tokens, ns_key=seg.ns_key, anchor=anchor, round=self.current_round,
                               agent=seg.agent, strong=True, master=part.clone(), pages=self._slot_pages(part),
                               copy_of=seg.copy_of or seg.key)
            node.used_round = self.current_round
            self._ledger.hold_seg(node.pages)
            node.holding = True
            self._n_holding += 1
            self._segments[key] = node
            self._seg_epoch += 1
            self.counters["master_copies"] += 1
            self.counters["rotated_tokens"] += len(part)
            self.lock_segment(node)
            pinned.append(node)
            for i in idx:
                out[i] = node
        return out

    def privatize(self, req: Any, positions: np.ndarray) -> bool:
        """Gives row positions of ``req`` that read a master private diff slots (written into its ``req_to_token``
        row; their KV is then recomputed). False (nothing changed) when the pool has no room."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return True
        fresh = self._alloc_slots(int(positions.size))
        if fresh is None:
            return False
        kv = req.kv
        released = self.diff.privatize(id(kv), positions, fresh)
        row = self.req_to_token_pool.req_to_token[kv.req_pool_idx]
        row[torch.from_numpy(positions).to(row.device)] = fresh.to(row.dtype)
        for seg in released:
            self._release_row_ref(seg)
        self.counters["privatized_tokens"] += int(positions.size)
        return True

    def validate_request(self, req: Any) -> Optional[str]:
        """The error message that should fail ``req`` with HTTP 400 (malformed table, unknown segment id, content
        mismatch), or None. Also records ``req.td_plan``."""
        if self.disable:
            try:
                parse_segment_table(getattr(req.sampling_params, "custom_params", None), len(req.origin_input_ids))
            except SegmentTableError as e:
                return str(e)
            return None
        return self.plan_for(req, force=True).error

    def plan_for(self, req: Any, *, force: bool = False) -> SegmentPlan:
        """Which registered segments ``req``'s prompt contains (``req.td_plan``); cheap when nothing changed."""
        prompt = req.origin_input_ids
        plan = getattr(req, "td_plan", None)
        if not force and plan is not None and plan.epoch == self._seg_epoch and plan.prompt_len == len(prompt):
            return plan
        cp = getattr(req.sampling_params, "custom_params", None)
        try:
            table = parse_segment_table(cp, len(prompt))
        except SegmentTableError as e:
            plan = SegmentPlan(None, None, None, self._ns_key(req), "none", [], str(e), self._seg_epoch, len(prompt))
            self._warn_once(req, plan.error + "; serving the request without segments")
            req.td_plan = plan
            return plan
        rnd = table.round if table is not None else None
        self._note_round(rnd)
        if table is not None and table.out_seg and table.out_seg not in self._ids:
            self._pending_ids.setdefault(table.out_seg, rnd)
        ns_key = self._ns_key(req, table.ns if table is not None else "")
        spans: list[PlannedSegment] = []
        error = None
        source = "none"
        now = time.monotonic()
        if table is not None and table.has_spans:
            source = "table"
            for i, sp in enumerate(table.spans):
                toks = prompt[sp.start : sp.end]
                rec = self._ids.get(sp.seg_id)
                if rec is None:
                    if sp.seg_id in self._pending_ids:
                        spans.append(PlannedSegment(sp.start, sp.end, sp.seg_id, None, "table", "pending", 0))
                        continue
                    error = (
                        f"segment {i}: unknown segment id {sp.seg_id!r} (no request registered it or announced it as "
                        f"td_out_seg)"
                    )
                    break
                node = self._segments.get(rec.key)
                if node is not None:
                    ok = _is_prefix(toks, node.tokens)
                elif len(toks) == rec.length:
                    ok = content_hash(toks, rec.ns_key) == rec.key
                else:
                    ok = len(toks) <= rec.length  # evicted and not verifiable: recomputed anyway
                if not ok:
                    msg = (
                        f"segment {i} ({sp.seg_id!r}): the prompt tokens [{sp.start}, {sp.end}) do not match the "
                        f"registered segment (segment does not match the prompt)"
                    )
                    if self.config.strict_content:
                        error = msg
                        break
                    self._warn_once(req, msg + "; the span is recomputed")
                    spans.append(PlannedSegment(sp.start, sp.end, sp.seg_id, rec.key, "table", "mismatch", 0))
                    continue
                if node is None or not self._weak_valid(node):
                    status, kv_len, anchor = "evicted", 0, None
                elif node.ns_key != ns_key:
                    status, kv_len, anchor = "other-namespace", 0, None
                else:
                    status, kv_len, anchor = "resident", min(node.kv_len, len(toks)), node.anchor
                if node is not None:
                    if rnd is not None and rnd > node.used_round:
                        node.used_round = rnd
                    node.last_access_time = now
                spans.append(PlannedSegment(sp.start, sp.end, sp.seg_id, rec.key, "table", status, kv_len, anchor))
            if error is not None:
                spans = []
                self._warn_once(req, error + "; serving the request without segments")
        elif self.config.detect and len(self._detector):
            for d in self._detector.find(prompt, ns_key):
                node = self._segments.get(d.key)
                if node is None:
                    continue
                valid = self._weak_valid(node)
                seg_id = min(node.ids) if node.ids else None
                spans.append(
                    PlannedSegment(d.start, d.end, seg_id, node.key, "detected", "resident" if valid else "evicted",
                                   min(node.kv_len, len(d)) if valid else 0, node.anchor if valid else None)
                )
                if rnd is not None and rnd > node.used_round:
                    node.used_round = rnd
                node.last_access_time = now
            if spans:
                source = "detected"
        plan = SegmentPlan(
            round=rnd, agent=table.agent if table is not None else None,
            out_seg=table.out_seg if table is not None else None, ns_key=ns_key, source=source, spans=spans,
            error=error, epoch=self._seg_epoch, prompt_len=len(prompt),
        )
        req.td_plan = plan
        return plan

    @staticmethod
    def _warn_once(req: Any, msg: str) -> None:
        if getattr(req, "_td_warned", None) != msg:
            req._td_warned = msg
            logger.warning("request %s: segment table: %s", getattr(req, "rid", "?"), msg)

    # ================================================================== diagnostics

    def pretty_print(self):
        super().pretty_print()
        print(f"#segments: {len(self._segments)} (holding {self._n_holding}), segment-only tokens: "
              f"{self.segment_only_size()}, evictable={self.evictable_size()}, protected={self.protected_size()}")
        for s in self._segments.values():
            print("  ", s)

    def stats(self) -> dict:
        segs = list(self._segments.values())
        return {
            "segments": len(segs),
            "strong": sum(s.strong for s in segs),
            "weak": sum(not s.strong for s in segs),
            "locked": sum(s.lock_ref > 0 for s in segs),
            "holding": self._n_holding,
            "segment_only_tokens": self.segment_only_size(),
            "evictable": self.evictable_size(),
            "protected": self.protected_size(),
            "current_round": self.current_round,
            "known_ids": len(self._ids),
            "rows": len(self.diff.rows),
            "recompute_policy": str(self.policy),
            "master_copies_resident": sum(s.copy_of is not None for s in segs),
            "master_copy_slots": int(sum(s.kv_len for s in segs if s.copy_of is not None and s.holding)),
            "master_slots": int(sum(s.kv_len for s in segs if s.holding)),
            "diff_slots": int(sum(r.private_tokens for r in self.diff.rows.values())),
            "rounds_seen": self.current_round + 1 if self._ids or self._pending_ids else 0,
            **self.counters,
            "prefill_by_round": {str(k): dict(v) for k, v in sorted(self.prefill_by_round.items())},
            "kv_per_agent_by_round": {
                str(k): {"rows": n, "tokens": round(t / n, 2), "bytes": round(t / n * self.diff.bytes_per_token),
                         "shared_tokens": round(sh / n, 2), "shared_held_tokens": round(sh_held / n, 2)}
                for k, (n, t, sh, sh_held) in sorted(self.kv_by_round.items()) if n
            },
        }

    def check_invariants(self) -> None:
        """Recomputes the page ledger from the radix tree and the segments and compares (AssertionError if not)."""
        L = self._ledger
        n = len(L.r)
        r = np.zeros(n, np.int64)
        rl = np.zeros(n, np.int64)
        s = np.zeros(n, np.int64)
        sl = np.zeros(n, np.int64)
        stack = list(self.root_node.children.values())
        while stack:
            x = stack.pop()
            stack.extend(x.children.values())
            if x.evicted:
                continue
            p = self._node_pages(x)
            np.add.at(r, p, 1)
            if x.lock_ref > 0:
                np.add.at(rl, p, 1)
        holding = 0
        for seg in self._segments.values():
            assert seg.lock_ref >= 0 and seg.row_refs >= 0 and seg.row_refs <= seg.lock_ref, seg
            if seg.lock_ref > 0:
                assert seg.holding, f"locked segment not holding: {seg!r}"
            if seg.holding:
                holding += 1
                np.add.at(s, seg.pages, 1)
                if seg.lock_ref > 0:
                    np.add.at(sl, seg.pages, 1)
            if seg.master is not None:
                assert np.array_equal(np.unique(seg.master.cpu().numpy() // self.page_size), seg.pages), seg
            assert seg.copy_of is not None or seg.key in self._detector or len(seg.tokens) < self._detector.min_len, seg
        assert holding == self._n_holding, (holding, self._n_holding)
        for name, ref in (("r", r), ("rl", rl), ("s", s), ("sl", sl)):
            assert np.array_equal(getattr(L, name).astype(np.int64), ref), f"ledger {name} differs"
        held = (r > 0) | (s > 0)
        prot = (rl > 0) | (sl > 0)
        assert int(held.sum()) == L.n_held and int(prot.sum()) == L.n_prot, (int(held.sum()), L.n_held)
        assert not (prot & ~held).any()


def build_collective_tree(ctx: Any, cls: type = CollectiveTree) -> CollectiveTree:
    """Factory for ``register_radix_cache_backend("tokendance", build_collective_tree)`` (``cls``: the cache class,
    :class:`~tokendance_sgl.pic.PicCache` for ``pic``)."""
    if getattr(ctx, "is_hybrid_swa", False) or getattr(ctx, "is_hybrid_ssm", False):
        raise NotImplementedError("the tokendance and pic backends support full-attention models only (no SWA / mamba)")
    if getattr(ctx, "enable_hierarchical_cache", False):
        raise NotImplementedError("the tokendance and pic backends do not support --enable-hierarchical-cache")
    overrides = {}
    td = getattr(getattr(ctx, "server_args", None), "_tokendance", None)
    if isinstance(td, dict):
        overrides = {k: v for k, v in td.items() if k in TreeConfig.__dataclass_fields__}
    params = ctx.params
    if getattr(ctx, "disable_radix_cache", False):
        params.disable = True
    tree = cls(params, TreeConfig.from_env(overrides))
    if tree.config.reuse and tree.page_size > 1:
        logger.warning("tokendance: segment reuse needs --page-size 1 for now; with page size %d segments are tracked "
                       "but every prompt is computed", tree.page_size)
        tree.config.reuse = False
    runner = getattr(getattr(ctx, "tp_worker", None), "model_runner", None)
    if tree.config.reuse and runner is not None:
        from tokendance_sgl.rope import spec_from_model

        tree.rope = spec_from_model(runner.model, getattr(ctx.server_args, "model_path", "this model"))
    if runner is not None:
        tree.num_layers = int(getattr(runner.model_config, "num_hidden_layers", 0) or 0)
    return tree
