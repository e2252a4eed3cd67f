"""Fidelity of approximate KV reuse against exact prefill, from SGLang ``/generate`` responses.

* **greedy agreement**: the fraction of the first ``n`` greedy tokens produced before the first divergence.
* **teacher-forced top-1 agreement**: over the prompt's scored positions (``logprob_start_len`` on), how often the
  most likely next token is the same (``meta_info.input_top_logprobs``).
* **mean KL** ``KL(exact || reuse)`` per scored position, truncated to the exact run's top-k tokens (the server returns
  top-k lists, not full distributions): ``sum_{t in topk(p)} p_t (log p_t - log q_t)``, where ``log q_t`` is the
  reuse run's logprob of ``t`` or, when ``t`` is outside its top-k, its k-th logprob (an upper bound on ``q_t``, so the
  estimate never exceeds the true truncated sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["greedy_agreement", "teacher_forced", "Fidelity", "compare_responses"]


def greedy_agreement(ref: Sequence[int], got: Sequence[int], n: int = 32) -> float:
    ref, got = list(ref)[:n], list(got)[:n]
    if not ref:
        return 1.0
    k = 0
    while k < min(len(ref), len(got)) and ref[k] == got[k]:
        k += 1
    return k / len(ref)


def _top(entry: Any) -> list[tuple[float, int]]:
    if not entry:
        return []
    return [(float(e[0]), int(e[1])) for e in entry if e is not None and e[0] is not None]


def teacher_forced(ref_meta: dict, meta: dict) -> tuple[int, float, float]:
    """(positions, top-1 agreement, mean truncated KL) over the positions both responses scored."""
    a = ref_meta.get("input_top_logprobs") or []
    b = meta.get("input_top_logprobs") or []
    if len(a) != len(b):
        raise ValueError(f"the two responses scored different prompt spans ({len(a)} vs {len(b)} positions)")
    n = agree = 0
    kl = 0.0
    for ea, eb in zip(a, b):
        pa, pb = _top(ea), _top(eb)
        if not pa or not pb:
            continue
        n += 1
        agree += max(pa)[1] == max(pb)[1]
        qb = {t: lp for lp, t in pb}
        floor = min(lp for lp, _ in pb)
        kl += sum(math.exp(lp) * (lp - qb.get(t, floor)) for lp, t in pa)
    return n, (agree / n if n else 1.0), (kl / n if n else 0.0)


@dataclass
class Fidelity:
    requests: int
    greedy: float  # mean greedy agreement of the first n tokens
    positions: int
    top1: float
    kl: float

    def as_dict(self) -> dict:
        return {"requests": self.requests, "greedy": round(self.greedy, 4), "positions": self.positions,
                "top1": round(self.top1, 4), "kl": round(self.kl, 5)}


def compare_responses(refs: Sequence[dict], gots: Sequence[dict], n: int = 32) -> Fidelity:
    """Pairs of ``/generate`` bodies (same prompts, greedy, ``return_logprob`` with ``top_logprobs_num``)."""
    greedy, pos, agree, kl = [], 0, 0.0, 0.0
    for r, g in zip(refs, gots, strict=True):
        greedy.append(greedy_agreement(r["output_ids"], g["output_ids"], n))
        k, t1, d = teacher_forced(r["meta_info"], g["meta_info"])
        pos += k
        agree += t1 * k
        kl += d * k
    return Fidelity(len(refs), sum(greedy) / max(1, len(greedy)), pos, agree / max(1, pos), kl / max(1, pos))
