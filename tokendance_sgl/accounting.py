"""Counters, per-round prefill work and KV accounting of the collective tree (``GET /tokendance/stats``).

Definitions (docs/architecture.md, "Metrics"):

* **KV per agent** of a released row: the slots it held for its prompt and output, the master slots it read
  counted as ``1 / rows_served`` each (``rows_served``: the rows that have read that master; the masters its
  cached path references count the same way), accumulated per round
  (``kv_per_agent_by_round``); ``shared_tokens`` / ``shared_held_tokens``: the row's segment-span tokens and the
  slots held for them. Summed over an agent's released rows, in bytes: ``kv_bytes_by_agent_cumulative``.
* **KV bytes by agent** (live rows): master bytes divided among the live rows reading them, plus each row's own
  slots (its diffs, the text composed for it and its tail past the cached prefix).
* **Prefill work per round**: tokens the forwards computed for a round's requests (extend, pre-pass, probes) and
  tokens x layers.
"""

from __future__ import annotations

from typing import Any, Optional

from tokendance_sgl.diff_alloc import DiffAllocator

__all__ = ["TreeStats", "COUNTERS", "pool_bytes_per_token"]

# Cumulative: composed rows; segment tokens read from masters / recomputed in context; text between segments computed
# by the pre-pass; private slots of composed regions; load-backs refused; rows inserted as persistent paths under an
# approximate namespace. Collective steps run (rounds planned together), re-rotation kernel calls they made; probe
# forwards for deviation selection (tokens, tokens x layers), selections measured, selections reused from the round
# (no probe), positions turned private after a selection, copies' last tokens computed (once per copy), compositions
# rolled back after a failure (the request was prefilled normally), pre-pass failures among them (the composed region
# was then computed in full); requests aborted because neither the pre-pass nor its fallback could run; pre-pass
# forwards run and the query tokens of the largest (at most --chunked-prefill-size); text before a row's first reused
# segment computed as a plain extend through the configured attention backend (the lead, part of the pre-pass); pages
# copied on write (page_size > 1: a row page mixing master tokens with the row's own) and the master tokens copied;
# selections left unmeasured because the pool had no room for the probe (those segments keep their static positions);
# rows composed from the plan of an earlier row of their round and base (reuse.RegionTemplate); admissions that took
# the collective step's prefix match instead of matching again (early_match.EarlyMatch); rows whose lead SGLang's
# chunked prefill computed, their region composed when the chunk reached it, and such regions that could no longer
# be planned there (lead_chunk); comparisons of the host's copies of the slots with the device's (slot_mirror).
COUNTERS = ("rows_composed", "reused_tokens", "recomputed_tokens", "prepass_text_tokens", "composed_private_slots",
            "load_back_fallbacks", "paths_inserted", "collect_steps", "collect_copy_calls", "probe_tokens",
            "probe_token_layers", "selections", "selections_shared", "privatized_tokens", "tails_computed", "rollbacks",
            "prepass_fallbacks", "prepass_aborts", "prepass_forwards", "prepass_largest_forward", "prepass_lead_tokens",
            "cow_pages", "cow_tokens", "probe_no_room", "compositions_shared", "matches_shared",
            "lead_chunks", "lead_regions_lost", "slot_checks")

_PREFILL_KEYS = ("extend_tokens", "prepass_tokens", "probe_tokens", "computed_tokens", "token_layers")


def pool_bytes_per_token(allocator: Any) -> float:
    """K+V bytes of one token over all layers: the KV pool's size divided by its slots (0.0 if unknown)."""
    try:
        kv = allocator.get_kvcache()
        k, v = kv.get_kv_size_bytes()
        rows = int(kv.size) + int(getattr(kv, "page_size", 1))
        return float(k + v) / rows if rows > 0 else 0.0
    except Exception:
        return 0.0


class TreeStats:
    def __init__(self):
        self.counters = {k: 0 for k in COUNTERS}
        self.num_layers = 0  # set from the loaded model (prefill work per layer)
        self.cum_bytes_by_agent: dict = {}
        self.prefill_by_round: dict = {}  # round -> tokens computed (extend, pre-pass, probe) and token-layers
        self.kv_by_round: dict = {}  # round -> [rows released, token-equivalents they held, shared-region tokens
        # of those rows, token-equivalents held for the shared region]

    def reset_rounds(self) -> None:
        """Per-round statistics restart with the cache (a flush starts a new run)."""
        self.kv_by_round.clear()
        self.prefill_by_round.clear()

    def note_load(self, lay_stats: dict) -> None:
        c = self.counters
        c["rows_composed"] += 1
        c["reused_tokens"] += lay_stats["reused"]
        c["recomputed_tokens"] += lay_stats["recomputed"]
        c["prepass_text_tokens"] += lay_stats["text"]
        c["composed_private_slots"] += lay_stats["private_slots"]

    def note_prefill(self, rnd: Optional[int], *, extend: int = 0, prepass: int = 0, probe: int = 0,
                     probe_token_layers: int = 0) -> None:
        """Prefill work of one forward for a round's requests (tokens and tokens x layers)."""
        d = self.prefill_by_round.setdefault(-1 if rnd is None else int(rnd), dict.fromkeys(_PREFILL_KEYS, 0))
        d["extend_tokens"] += extend
        d["prepass_tokens"] += prepass
        d["probe_tokens"] += probe
        d["computed_tokens"] += extend + prepass
        d["token_layers"] += (extend + prepass) * self.num_layers + probe_token_layers

    def note_release(self, rnd: Optional[int], agent: Optional[int], allocated: int, shared: float, runs: Any,
                     bytes_per_token: float) -> None:
        """A released row of ``agent``: ``allocated`` slots in its row, ``shared`` segment-span tokens, ``runs`` the
        rows ``[a, b)`` that reference the master of ``seg`` for each ``(a, b, seg)`` (the cached path's and the
        region composed for it: :meth:`RequestState.master_runs`). Its KV per agent goes to its round and, in bytes,
        to its agent's cumulative total."""
        if allocated <= 0:
            return
        saved = 0.0
        for a, b, seg in runs:  # sorted by start
            if a >= allocated:
                break
            served = seg.rows_served
            if served > 1:
                n = (b if b < allocated else allocated) - a
                saved += n - n / served
        acc = self.kv_by_round.setdefault(-1 if rnd is None else int(rnd), [0, 0.0, 0.0, 0.0])
        held = float(allocated) - saved
        acc[0] += 1
        acc[1] += held
        acc[2] += shared
        acc[3] += shared - saved
        self.cum_bytes_by_agent[agent] = self.cum_bytes_by_agent.get(agent, 0.0) + held * bytes_per_token

    @staticmethod
    def live_row_tokens(diff: DiffAllocator) -> dict:
        """Row key -> token-equivalents the live row holds: masters divided among the rows reading them, its composed
        private slots and its tail past the cached prefix (one pass over the live rows' master slots)."""
        out = diff.row_kv_tokens()
        page_size = diff.page_size
        for key, rec in diff.rows.items():
            kv = rec.owner
            allocated = int(getattr(kv, "kv_allocated_len", 0) or 0)
            if allocated:
                owned_from = max(int(getattr(kv, "cache_protected_len", 0) or 0), rec.end)
                out[key] += max(0, -(-allocated // page_size) * page_size - owned_from)
        return out

    def kv_bytes_by_agent(self, diff: DiffAllocator) -> dict:
        out: dict = {}
        for key, toks in self.live_row_tokens(diff).items():
            agent = diff.rows[key].agent
            out[agent] = out.get(agent, 0.0) + toks * diff.bytes_per_token
        return out

    def report(self, bytes_per_token: float) -> dict:
        return {
            **self.counters,
            "prefill_by_round": {str(k): dict(v) for k, v in sorted(self.prefill_by_round.items())},
            "kv_per_agent_by_round": {
                str(k): {"rows": n, "tokens": round(t / n, 2), "bytes": round(t / n * bytes_per_token),
                         "shared_tokens": round(sh / n, 2), "shared_held_tokens": round(sh_held / n, 2)}
                for k, (n, t, sh, sh_held) in sorted(self.kv_by_round.items()) if n
            },
        }
