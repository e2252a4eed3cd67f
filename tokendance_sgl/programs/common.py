"""Shared parts of the example multi-agent programs: backend choice, the result record, the report, the CLI."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)

#: meta_info keys kept per generated variable
META_KEYS = ("prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason", "e2e_latency")


def make_backend(url_or_backend: Any, *, plain: bool = False, **kwargs: Any):
    """A TokenDanceEndpoint for a URL (SGLang's RuntimeEndpoint with ``plain=True``); a backend object is returned
    as is."""
    if not isinstance(url_or_backend, str):
        return url_or_backend
    if plain:
        from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

        return RuntimeEndpoint(url_or_backend.rstrip("/"), **kwargs)
    from tokendance_sgl.endpoint import TokenDanceEndpoint

    return TokenDanceEndpoint(url_or_backend, **kwargs)


def short_meta(meta: Optional[dict]) -> dict:
    meta = meta or {}
    return {k: meta.get(k) for k in META_KEYS if k in meta}


@dataclass
class ProgramResult:
    """What a program run produced.

    ``transcript``: one dict per (round, agent): ``round``, ``agent``, ``name``, the generated variables (and
    ``reaction`` in the feed), ``meta`` (per generated variable: prompt/cached/completion tokens, finish reason).
    ``rounds``: one dict per round (:func:`round_meta`): ``round``, ``latency_s`` (start of the round to the gather
    that closes it), ``requests``, ``prompt_tokens``, ``cached_tokens``, ``completion_tokens``,
    ``cached_tokens_per_agent``, ``first_cached_tokens``. ``blocks``: the gathered block text of every round."""

    program: str
    base_url: str
    backend: str
    n_agents: int
    n_rounds: int
    settings: dict
    names: list
    transcript: list
    rounds: list
    blocks: list
    total_s: float
    texts: list = field(default_factory=list, repr=False)  # every agent's full final text
    token_ids: Optional[list] = field(default=None, repr=False)  # every agent's final token ids (TokenDanceEndpoint)

    def outputs(self, round_: int, var: str) -> list:
        """``var`` of every agent in a round, in agent order."""
        rows = sorted((t for t in self.transcript if t["round"] == round_), key=lambda t: t["agent"])
        return [t[var] for t in rows]

    def summary(self) -> dict:
        lat = [r["latency_s"] for r in self.rounds]
        prompt = sum(r["prompt_tokens"] for r in self.rounds)
        cached = sum(r["cached_tokens"] for r in self.rounds)
        return {
            "program": self.program,
            "backend": self.backend,
            "n_agents": self.n_agents,
            "rounds": self.n_rounds,
            "total_s": self.total_s,
            "round_latency_mean_s": statistics.fmean(lat) if lat else 0.0,
            "requests": sum(r["requests"] for r in self.rounds),
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "cache_hit_rate": cached / prompt if prompt else 0.0,
            "completion_tokens": sum(r["completion_tokens"] for r in self.rounds),
        }

    def to_json(self, *, include_texts: bool = False) -> dict:
        d = {
            "program": self.program,
            "base_url": self.base_url,
            "backend": self.backend,
            "settings": self.settings,
            "names": self.names,
            "summary": self.summary(),
            "rounds": self.rounds,
            "transcript": self.transcript,
            "blocks": self.blocks,
        }
        if include_texts:
            d["texts"] = self.texts
            d["token_ids"] = self.token_ids
        return d


def round_meta(round_: int, latency_s: float, rows: list, states: Optional[list] = None) -> dict:
    """Per-round numbers. With a TokenDanceEndpoint (``states`` given, one per agent) every request of the round
    counts (``select`` and prefill requests too); otherwise the round's ``gen`` requests (their ``meta_info``).
    ``first_cached_tokens``: cached tokens of each agent's first request of the round (the one that meets the new
    gathered block first), summed."""
    per_agent = None
    if states:
        backend = states[0].stream_executor.backend
        if hasattr(backend, "request_log"):
            per_agent = [[q for q in backend.request_log(st) if q["round"] == round_] for st in states]
    if per_agent is None:
        per_agent = [list(row["meta"].values()) for row in rows]

    def total(key, reqs):
        return sum(int(q.get(key) or 0) for q in reqs)

    flat = [q for reqs in per_agent for q in reqs]
    return {
        "round": round_,
        "latency_s": latency_s,
        "requests": len(flat),
        "prompt_tokens": total("prompt_tokens", flat),
        "cached_tokens": total("cached_tokens", flat),
        "completion_tokens": total("completion_tokens", flat),
        "cached_tokens_per_agent": [total("cached_tokens", reqs) for reqs in per_agent],
        "first_cached_tokens": sum(int(reqs[0].get("cached_tokens") or 0) for reqs in per_agent if reqs),
    }


def program_output(s: Any, states: list, names: list, transcript: list, per_round: list, blocks: list) -> dict:
    """The return value of a program function: its records plus every agent's final text (and token ids with a
    TokenDanceEndpoint)."""
    backend = s.stream_executor.backend
    return {"transcript": transcript, "rounds": per_round, "blocks": blocks, "texts": [st.text() for st in states],
            "token_ids": [backend.token_ids(st) for st in states] if hasattr(backend, "token_ids") else None,
            "names": names}


def run_program(name: str, function: Any, backend: Any, *, n_agents: int, n_rounds: int, settings: dict,
                **arguments: Any) -> ProgramResult:
    """Runs an ``@sgl.function`` program that returns :func:`program_output` on ``backend``; raises its error."""
    t0 = time.perf_counter()
    state = function.run(backend=backend, **arguments)
    if state.error() is not None:
        raise state.error()
    out = state.ret_value
    return ProgramResult(
        program=name, base_url=getattr(backend, "base_url", ""), backend=type(backend).__name__,
        n_agents=n_agents, n_rounds=n_rounds, settings=settings, names=out["names"], transcript=out["transcript"],
        rounds=out["rounds"], blocks=out["blocks"], total_s=time.perf_counter() - t0, texts=out["texts"],
        token_ids=out["token_ids"],
    )


def format_report(result: ProgramResult, *, show_transcript: bool = True, vars_: tuple = ()) -> str:
    lines = []
    if show_transcript:
        for r in range(result.n_rounds):
            lines.append(f"== round {r}")
            for t in sorted((t for t in result.transcript if t["round"] == r), key=lambda t: t["agent"]):
                parts = [f"{v}: {t[v]!r}" for v in vars_ if v in t]
                lines.append(f"  {t['name']}: " + "  ".join(parts))
    headers = ["round", "latency_s", "requests", "prompt_tok", "cached_tok", "cached_first", "generated"]
    rows = [[str(r["round"]), f"{r['latency_s']:.2f}", str(r["requests"]), str(r["prompt_tokens"]),
             str(r["cached_tokens"]), str(r["first_cached_tokens"]), str(r["completion_tokens"])]
            for r in result.rounds]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    s = result.summary()
    lines.append(f"summary: {s['n_agents']} agents x {s['rounds']} rounds in {s['total_s']:.1f}s via {s['backend']}; "
                 f"prompt {s['prompt_tokens']} tok, cached {s['cached_tokens']} ({100 * s['cache_hit_rate']:.1f}%), "
                 f"generated {s['completion_tokens']}")
    return "\n".join(lines)


def fetch_stats(url: str) -> Optional[dict]:
    """``GET /tokendance/stats`` (None if the server does not answer it)."""
    import requests

    try:
        r = requests.get(url.rstrip("/") + "/tokendance/stats", timeout=60)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def cli(description: str, run: Callable[..., ProgramResult], *, agents: int, rounds: int, max_new_tokens: int,
        vars_: tuple, argv: Optional[list] = None, extra: Optional[Callable] = None) -> int:
    """The programs' command line. ``extra(parser)`` may add flags; it returns a function of the parsed
    arguments giving extra keyword arguments for ``run``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default="http://127.0.0.1:30000", help="a running SGLang server (default %(default)s)")
    p.add_argument("--agents", type=int, default=agents, help="number of agents (default %(default)s)")
    p.add_argument("--rounds", type=int, default=rounds, help="number of rounds (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="max new tokens per generation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="picks personas and the opening event (default 0)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--plain", action="store_true",
                   help="use SGLang's RuntimeEndpoint (text requests, no segment table) instead of TokenDanceEndpoint")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    more = extra(p) if extra is not None else (lambda _a: {})
    a = p.parse_args(argv)
    if a.agents < 1 or a.rounds < 1 or a.max_new_tokens < 1:
        p.error("--agents, --rounds and --max-new-tokens must be >= 1")
    res = run(a.url, agents=a.agents, rounds=a.rounds, max_new_tokens=a.max_new_tokens, seed=a.seed,
              temperature=a.temperature, plain=a.plain, **more(a))
    print(format_report(res, show_transcript=not a.quiet, vars_=vars_))
    stats = fetch_stats(a.url)
    if stats and "reused_tokens" in stats:
        keys = ("reused_tokens", "recomputed_tokens", "rows_composed", "master_copies", "segments", "known_ids")
        print("tokendance stats: " + ", ".join(f"{k} {stats.get(k)}" for k in keys))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({**res.to_json(include_texts=True), "server_stats": stats}, fh, indent=1)
    return 0
