"""Recompute policies: which tokens of a reused segment are recomputed in the new context.

A reused segment's KV was computed in another context (another agent's prompt, another position). Re-rotation fixes
the position; the chosen tokens are recomputed in this row so the rest of the prompt attends to fresh KV there.

Policies (``--td-recompute POLICY``, ``TOKENDANCE_RECOMPUTE``, or per request ``custom_params["td_recompute"]``):

* ``full``   -- recompute every segment token at its true position: no master reuse, no position gap. This is exact
  prefill computed through the reuse machinery (the reference the others are measured against).
* ``none``   -- recompute nothing: every segment token reads the master.
* ``sink:k`` -- recompute the first ``k`` tokens of every segment (the spurious "attention sink" at each block start).

Selection by K/V deviation (``deviation:r``) is planned with the KV collector; it is refused here until it lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RecomputePolicy", "DEFAULT_POLICY", "parse_policy"]

DEFAULT_POLICY = "sink:4"


@dataclass(frozen=True)
class RecomputePolicy:
    kind: str  # "full" | "none" | "sink"
    k: int = 0

    @property
    def reuses_masters(self) -> bool:
        return self.kind != "full"

    def offsets(self, n: int) -> np.ndarray:
        """Offsets (0-based, sorted) of the recomputed tokens among a segment's ``n`` reused tokens."""
        if self.kind == "full":
            return np.arange(n, dtype=np.int64)
        if self.kind == "sink":
            return np.arange(min(self.k, n), dtype=np.int64)
        return np.empty(0, dtype=np.int64)

    def __str__(self) -> str:
        return f"sink:{self.k}" if self.kind == "sink" else self.kind


def parse_policy(spec) -> RecomputePolicy:
    """``"full" | "none" | "sink:K"`` -> :class:`RecomputePolicy` (ValueError with the accepted forms otherwise)."""
    if isinstance(spec, RecomputePolicy):
        return spec
    s = str(spec).strip().lower()
    if s in ("full", "none"):
        return RecomputePolicy(s)
    if s.startswith("sink:"):
        try:
            k = int(s.split(":", 1)[1])
        except ValueError:
            k = -1
        if k >= 0:
            return RecomputePolicy("sink", k)
    if s.startswith("deviation"):
        raise ValueError(f"recompute policy {spec!r}: deviation-based selection is not implemented yet")
    raise ValueError(f"unknown recompute policy {spec!r}; use full, none or sink:K (K >= 0)")
