"""The prefix match the collective step makes for a waiting request, taken again at the request's admission.

The collective step (:meth:`~tokendance_sgl.collector.KVCollector.collect`) matches every waiting request in both
namespaces (the exact one and its policy's approximate one) to plan the round's copies; SGLang matches the request
again when it admits it. The step's match is kept (:class:`EarlyMatch`) and taken at admission instead of two more
walks of the tree while it provably still holds:

* the key is the same (tokens, limit, namespace, salt);
* no radix node was evicted since (the tree's eviction generation): every node the match names is still in the tree
  with the same slots (a split keeps them);
* the node where each namespace's match ended still has no child for the key's next tokens: no longer match exists
  (an insert of another path under the same node, say the next agent's in the same namespace, does not matter);
* where the exact namespace was not walked (below), no key inserted there since reaches the approximate match.

The exact namespace is not walked when it cannot win: :class:`LongestKeys` keeps, for each first page of each
namespace, the longest key inserted under it -- an upper bound on any match there. An agent whose rows were composed
keeps its history in its approximate namespace; the exact one holds only its first rounds, shorter than that match.

The region layout the step planned on the match is kept with it and taken too while, in addition, the request's
segment plan and the segment store's epoch are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from tokendance_sgl.position_map import NO_SHIFT, PositionMap

__all__ = ["EarlyMatch", "LongestKeys", "approx_namespace", "best_match"]


def approx_namespace(extra_key: Optional[str], policy: Any) -> str:
    """The radix namespace of rows that read approximate KV under ``policy`` (never the exact one)."""
    return f"{extra_key}|td:{policy}" if extra_key else f"td:{policy}"


def _sig(key: Any) -> tuple:
    return (len(key.token_ids), key.limit, key.extra_key, key.cache_salt)


def _next_child(match: Any, key: Any, page_size: int) -> tuple:
    """Where ``match`` (of ``key``) ended, and the child key a longer match would need there (None: the key ends)."""
    n = match.device_prefix_len
    return match.last_device_node, (key.child_key_at(n, page_size) if n + page_size <= len(key) else None)


class LongestKeys:
    """The longest key inserted under each first page of each namespace (the child key of the tree's root that holds
    it): no match of a key under that page is longer. It only grows (an eviction leaves it an upper bound)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._longest: dict = {}
        self._bounded = True  # False once a key was inserted below the root (nothing noted bounds its path)

    def clear(self) -> None:
        self._longest.clear()
        self._bounded = True

    def first_page(self, key: Any) -> Any:
        """The root child key ``key`` lies under (None: shorter than a page)."""
        return key.child_key(self.page_size) if len(key) >= self.page_size else None

    def note(self, key: Any, *, from_root: bool = True) -> None:
        """``key`` (page-aligned, as inserted) was inserted from the root (``from_root`` False: below a node)."""
        page = self.first_page(key)
        if not from_root:
            self._bounded = False
        elif page is not None and len(key) > self._longest.get(page, 0):
            self._longest[page] = len(key)

    def at_most(self, page: Any) -> float:
        """No match under ``page`` (a :meth:`first_page`) is longer than this."""
        if not self._bounded:
            return float("inf")
        return self._longest.get(page, 0) if page is not None else 0


@dataclass(eq=False, slots=True)
class EarlyMatch:  # never changed after it is made
    sig: tuple  # (tokens, limit, extra_key, cache_salt) of the key it matched
    gen: int  # the tree's eviction generation when matched
    watch: tuple  # ((node, child key or None), ...): where the exact and the approximate match ended, and the child
    # a longer match would need there (None: the key ends there)
    result: Any  # MatchResult: the longer of the two
    namespace: Optional[str]  # the namespace it lies in (None: the exact one)
    positions: PositionMap  # position map of the matched path
    layout: Any = None  # RowLayout planned on this match (None: nothing to reuse)
    planned_on: tuple = ()  # (segment plan, store epoch) the layout was planned from
    unwalked: tuple = ()  # (LongestKeys, first page, length): the exact namespace was not walked, as no key there
    # reached the approximate match's length

    @classmethod
    def of(cls, key: Any, gen: int, matches: tuple, page_size: int, result: Any, namespace: Optional[str],
           positions: PositionMap, layout: Any = None, planned_on: tuple = (), unwalked: tuple = ()
           ) -> "EarlyMatch":
        """``matches``: (match, the RadixKey it matched) of each namespace (None: not matched)."""
        watch = tuple(_next_child(m, k, page_size) for m, k in (x for x in matches if x is not None))
        return cls(_sig(key), gen, watch, result, namespace, positions, layout, planned_on, unwalked)

    def layout_for(self, plan: Any, epoch: int) -> tuple[bool, Any]:
        """(whether the layout planned on this match still holds, the layout): it does while the request's segment
        plan is the same object and the store's epoch has not moved (no segment registered or dropped since)."""
        ok = bool(self.planned_on) and self.planned_on[0] is plan and self.planned_on[1] == epoch
        return ok, self.layout

    def holds(self, key: Any, gen: int) -> bool:
        """Whether the match still holds for ``key`` (module docstring); if so, its path counts as used now (the
        access times a new match would refresh, for SGLang's LRU eviction)."""
        if self.gen != gen or self.sig != _sig(key) or any(c is not None and c in n.children for n, c in self.watch):
            return False
        if self.unwalked and self.unwalked[0].at_most(self.unwalked[1]) >= self.unwalked[2]:
            return False  # a key inserted in the exact namespace since may match as far
        now = time.monotonic()
        node = self.result.last_device_node
        while node is not None:
            node.last_access_time = now
            node = node.parent
        return True


def best_match(tree: Any, policy: Any, req: Any, key: RadixKey, exact: Any = None) -> tuple:
    """The longer of ``tree``'s match of ``key`` in the exact namespace (``exact``, when made already) and its match
    in the approximate namespace of ``req``'s ``policy``; the exact one wins a tie. The exact namespace is not walked
    when no key inserted there under the key's first page reaches the approximate match (module docstring). Returns
    (result, namespace of the match or None, position map of the matched path, (exact match, key) or None,
    (approximate match, key) or None, what :class:`EarlyMatch` watches where the exact namespace was not walked)."""
    alt, unwalked = None, ()
    if tree.config.reuse and policy.reuses_masters:
        ns = approx_namespace(req.extra_key, policy)
        alt_key = RadixKey(key.token_ids, ns, is_bigram=key.is_bigram, limit=key.limit, cache_salt=key.cache_salt)
        alt = (RadixCache.match_prefix(tree, MatchPrefixParams(key=alt_key)), alt_key)
    if exact is None:
        n, page = (alt[0].device_prefix_len if alt else 0), tree.longest_keys.first_page(key)
        if n > tree.longest_keys.at_most(page) and not tree.is_eagle:
            unwalked = (tree.longest_keys, page, n)
        else:
            exact = RadixCache.match_prefix(tree, MatchPrefixParams(key=key))
    if alt is None or (exact is not None and alt[0].device_prefix_len <= exact.device_prefix_len):
        return exact, None, NO_SHIFT, (exact, key), alt, ()
    pmap = tree.path_positions.map_of(alt[0].last_device_node, tree.root_node)
    return alt[0], ns, pmap, ((exact, key) if exact is not None else None), alt, unwalked
