"""The prefix match the collective step makes for a waiting request, taken again at the request's admission.

The collective step (:meth:`~tokendance_sgl.collector.KVCollector.collect`) matches every waiting request in both
namespaces (the exact one and its policy's approximate one) to plan the round's copies; SGLang matches the request
again when it admits it. The step's match is kept (:class:`EarlyMatch`) and taken at admission instead of two more
walks of the tree while it provably still holds:

* the key is the same (tokens, limit, namespace, salt);
* no radix node was evicted since (the tree's eviction generation): every node the match names is still in the tree
  with the same slots (a split keeps them);
* the node where each namespace's match ended still has no child for the key's next tokens: no longer match exists
  (an insert of another path under the same node, say the next agent's in the same namespace, does not matter).

The region layout the step planned on the match is kept with it and taken too while, in addition, the request's
segment plan and the segment store's epoch are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from tokendance_sgl.position_map import PositionMap

__all__ = ["EarlyMatch"]


def _sig(key: Any) -> tuple:
    return (len(key.token_ids), key.limit, key.extra_key, key.cache_salt)


def _next_child(match: Any, key: Any, page_size: int) -> tuple:
    """Where ``match`` (of ``key``) ended, and the child key a longer match would need there (None: the key ends)."""
    n = match.device_prefix_len
    return match.last_device_node, (key.child_key_at(n, page_size) if n + page_size <= len(key) else None)


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

    @classmethod
    def of(cls, key: Any, gen: int, matches: tuple, page_size: int, result: Any, namespace: Optional[str],
           positions: PositionMap, layout: Any = None, planned_on: tuple = ()) -> "EarlyMatch":
        """``matches``: (match, the RadixKey it matched) of each namespace (None: not matched)."""
        watch = tuple(_next_child(m, k, page_size) for m, k in (x for x in matches if x is not None))
        return cls(_sig(key), gen, watch, result, namespace, positions, layout, planned_on)

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
        now = time.monotonic()
        node = self.result.last_device_node
        while node is not None:
            node.last_access_time = now
            node = node.parent
        return True
