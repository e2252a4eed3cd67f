"""Recompute policies: which tokens of a reused segment are recomputed in the new context.

A reused segment's KV was computed in another context (another agent's prompt, another position). Re-rotation fixes
the position; the chosen tokens are recomputed in this row so the rest of the prompt attends to fresh KV there.

Policies (``--td-recompute POLICY``, ``TOKENDANCE_RECOMPUTE``, or per request ``custom_params["td_recompute"]``):

* ``full``   -- recompute every segment token at its true position: no master reuse, no position gap. This is exact
  prefill computed through the reuse machinery (the reference the others are measured against).
* ``none``   -- recompute nothing: every segment token reads the master.
* ``sink:k`` -- recompute the first ``k`` tokens of every segment (the spurious "attention sink" at each block start).
* ``deviation:r[:L]`` -- CacheBlend-style selection: compute the check layer ``L`` (default 1) K/V of the segment's
  tokens in a real context, compare them with the reused K/V, and recompute the ``ceil(r * n)`` tokens that deviate
  most. ``tokendance`` does this once per segment and round on one pilot agent and uses the same positions for every
  agent (the collective step); ``pic`` does it for every request in its own context.
* combinations joined by ``+``: ``sink:4+deviation:0.15`` recomputes the sink tokens and the top 15 % of the rest.

With ``page_size > 1`` a recomputed token makes its row page the row's own (copied on write); ``deviation`` then
takes its budget page by page (:func:`by_page`, ``TOKENDANCE_PAGE_SELECT``, on by default), so the same number of
recomputed tokens costs fewer copied pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tokendance_sgl.host import to_host

__all__ = ["RecomputePolicy", "DEFAULT_POLICY", "DEFAULT_CHECK_LAYER", "parse_policy", "deviation_scores",
           "by_page"]

DEFAULT_POLICY = "sink:4"
DEFAULT_CHECK_LAYER = 1

_FORMS = "full, none, sink:K, deviation:R[:LAYER] (0 < R <= 1), or sink:K+deviation:R"


@dataclass(frozen=True)
class RecomputePolicy:
    kind: str  # "full" | "none" | "select"
    k: int = 0  # sink tokens per segment
    ratio: float = 0.0  # deviation fraction of the remaining tokens
    layer: int = DEFAULT_CHECK_LAYER  # check layer of the deviation

    @property
    def reuses_masters(self) -> bool:
        return self.kind != "full"

    @property
    def needs_scores(self) -> bool:
        """True when the choice depends on measured K/V deviation (a probe forward is needed)."""
        return self.kind == "select" and self.ratio > 0

    def offsets(self, n: int) -> np.ndarray:
        """The offsets (0-based, sorted) chosen without measuring anything: every one for ``full``, the sink tokens
        otherwise (the deviation part is added by :meth:`choose`)."""
        if self.kind == "full":
            return np.arange(n, dtype=np.int64)
        return np.arange(min(self.k, n), dtype=np.int64)

    def budget(self, n: int) -> int:
        """Tokens recomputed among a segment's ``n`` reused tokens."""
        if self.kind == "full":
            return n
        k = min(self.k, n)
        return k + (min(n - k, math.ceil(self.ratio * n - 1e-9)) if self.ratio > 0 else 0)

    def choose(self, n: int, scores: Optional[torch.Tensor | np.ndarray] = None, *,
               pages: Optional[tuple[int, int]] = None) -> np.ndarray:
        """The sorted offsets to recompute among ``n`` tokens; ``scores`` (one per token, higher = deviates more) is
        required when :attr:`needs_scores`. ``pages=(row_start, page_size)``: the same budget, taken page by page of
        the row (the run starts at row position ``row_start``), the pages whose tokens deviate most in total first,
        so fewer pages are copied on write (:func:`by_page`)."""
        base = self.offsets(n)
        if not self.needs_scores:
            return base
        if scores is None or len(scores) != n:
            raise ValueError(f"policy {self} needs {n} deviation scores, got {None if scores is None else len(scores)}")
        s = torch.as_tensor(scores, dtype=torch.float32).clone()
        s[torch.as_tensor(base, dtype=torch.long, device=s.device)] = -math.inf  # the sink tokens are chosen already
        extra = self.budget(n) - base.size
        if pages is not None and pages[1] > 1 and extra > 0:
            return np.unique(np.concatenate([base, by_page(to_host(s, torch.float32), extra, *pages)]))
        top = to_host(torch.topk(s, extra).indices) if extra > 0 else np.empty(0, np.int64)
        return np.unique(np.concatenate([base, top.astype(np.int64)]))

    def __str__(self) -> str:
        if self.kind != "select":
            return self.kind
        parts = []
        if self.k:
            parts.append(f"sink:{self.k}")
        if self.ratio > 0:
            parts.append(f"deviation:{self.ratio:g}" + (f":{self.layer}" if self.layer != DEFAULT_CHECK_LAYER else ""))
        return "+".join(parts) or "sink:0"


def _bad(spec, why: str = "") -> ValueError:
    return ValueError(f"unknown recompute policy {spec!r}{': ' + why if why else ''}; use {_FORMS}")


def parse_policy(spec) -> RecomputePolicy:
    """A policy string (see the module docstring) -> :class:`RecomputePolicy`; ValueError naming the accepted forms."""
    if isinstance(spec, RecomputePolicy):
        return spec
    s = str(spec).strip().lower()
    if s in ("full", "none"):
        return RecomputePolicy(s)
    k, ratio, layer = None, None, DEFAULT_CHECK_LAYER
    for part in s.split("+"):
        name, _, arg = part.strip().partition(":")
        try:
            if name == "sink" and k is None:
                k = int(arg)
                if k < 0:
                    raise _bad(spec, "K must be >= 0")
            elif name == "deviation" and ratio is None:
                r, _, lay = arg.partition(":")
                ratio = float(r)
                layer = int(lay) if lay else DEFAULT_CHECK_LAYER
                if not (0 < ratio <= 1) or layer < 0:
                    raise _bad(spec, "R must lie in (0, 1] and LAYER be >= 0")
            else:
                raise _bad(spec)
        except ValueError as e:
            raise e if "unknown recompute policy" in str(e) else _bad(spec) from None
    return RecomputePolicy("select", k or 0, ratio or 0.0, layer)


def deviation_scores(k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """Per token: squared L2 distance between the K/V computed in context and the reused K/V, summed over heads
    (tensors ``[n, heads, head_dim]`` or ``[n, dim]``), relative to the reused K/V's own squared norm."""
    n = k_new.shape[0]
    dk = (k_new.float() - k_old.float()).reshape(n, -1).pow(2).sum(-1)
    dv = (v_new.float() - v_old.float()).reshape(n, -1).pow(2).sum(-1)
    norm = k_old.float().reshape(n, -1).pow(2).sum(-1) + v_old.float().reshape(n, -1).pow(2).sum(-1)
    return (dk + dv) / norm.clamp_min(1e-12)


def by_page(scores: np.ndarray, budget: int, row_start: int, page_size: int) -> np.ndarray:
    """``budget`` offsets among ``scores`` (``-inf``: not a candidate), whole row pages at a time: pages in order of
    their candidates' total score, every candidate of a page taken (the last page: its best candidates)."""
    cand = np.nonzero(np.isfinite(scores))[0]
    page = (row_start + cand) // page_size
    total = np.bincount(page - page.min(), weights=scores[cand]) if cand.size else np.empty(0)
    out: list = []
    for p in np.argsort(-total, kind="stable") + (page.min() if cand.size else 0):
        if budget <= 0:
            break
        mine = cand[page == p]
        mine = mine[np.argsort(-scores[mine], kind="stable")][:budget]
        out.append(mine)
        budget -= mine.size
    return np.sort(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)
