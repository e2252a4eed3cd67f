"""Round runner: drive an All-Gather workload against a running SGLang server over HTTP.

Each round releases all agents' requests at once (``POST /generate`` with ``input_ids`` and the segment table in
``sampling_params.custom_params``), waits for every response (a barrier), and builds the next round from the
real generated token ids (``output_ids`` of the response, which SGLang 0.5.23 returns for non-streaming requests;
it includes the stop token, which the workload strips).

Recorded per round: latency (release of the round to the last response), prompt tokens (total and per agent),
``meta_info.cached_tokens`` (total and per agent), generated tokens, shared-segment tokens, outputs (ids and text).

Public functions: :func:`run_workload`, :func:`format_table`, :func:`wait_for_server`, :func:`flush_cache`;
:meth:`RunResult.to_json` for the machine-readable record.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import requests

from tokendance_sgl.workloads import AgentRequest, Workload


class ServerError(RuntimeError):
    """The server answered with an HTTP error or a response the runner cannot use."""


@dataclass
class AgentRecord:
    agent: int
    prompt_tokens: int  # len(input_ids) sent
    server_prompt_tokens: int  # meta_info.prompt_tokens
    cached_tokens: int  # meta_info.cached_tokens
    shared_tokens: int  # tokens inside this request's segment spans
    generated_tokens: int  # meta_info.completion_tokens
    latency_s: float  # this request: sent -> response received
    finish_reason: Any
    output_ids: list[int]  # raw, as returned (may end with the stop id)
    segment_ids: list[int]  # cleaned: what the next round uses as this agent's segment
    text: str
    input_ids: list[int] = field(default_factory=list, repr=False)
    segments: list[tuple[str, int, int]] = field(default_factory=list, repr=False)
    custom_params: dict[str, Any] = field(default_factory=dict, repr=False)
    meta_info: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class RoundRecord:
    round: int
    latency_s: float  # release of the round's requests -> last response
    agents: list[AgentRecord]
    turn: int = 0  # the assistant turn within the round (workloads with several turns per round)

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.agents)

    @property
    def cached_tokens(self) -> int:
        return sum(a.cached_tokens for a in self.agents)

    @property
    def generated_tokens(self) -> int:
        return sum(a.generated_tokens for a in self.agents)

    @property
    def shared_tokens(self) -> int:
        return sum(a.shared_tokens for a in self.agents)

    @property
    def prompt_tokens_per_agent(self) -> list[int]:
        return [a.prompt_tokens for a in self.agents]

    @property
    def cached_tokens_per_agent(self) -> list[int]:
        return [a.cached_tokens for a in self.agents]

    @property
    def generated_tokens_per_agent(self) -> list[int]:
        return [a.generated_tokens for a in self.agents]

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def summary(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "turn": self.turn,
            "n_agents": self.n_agents,
            "latency_s": self.latency_s,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_per_agent": self.prompt_tokens_per_agent,
            "shared_tokens": self.shared_tokens,
            "cached_tokens": self.cached_tokens,
            "cached_tokens_per_agent": self.cached_tokens_per_agent,
            "uncached_tokens": self.uncached_tokens,
            "generated_tokens": self.generated_tokens,
            "generated_tokens_per_agent": self.generated_tokens_per_agent,
            "request_latency_s": [a.latency_s for a in self.agents],
        }


@dataclass
class RunResult:
    base_url: str
    workload: dict[str, Any]
    settings: dict[str, Any]
    rounds: list[RoundRecord]
    total_s: float

    def summary(self) -> dict[str, Any]:
        lat = [r.latency_s for r in self.rounds]
        prompt = sum(r.prompt_tokens for r in self.rounds)
        cached = sum(r.cached_tokens for r in self.rounds)
        gen = sum(r.generated_tokens for r in self.rounds)
        return {
            "rounds": len(self.rounds),
            "n_agents": self.workload.get("n_agents"),
            "total_s": self.total_s,
            "round_latency_mean_s": statistics.fmean(lat) if lat else 0.0,
            "round_latency_max_s": max(lat) if lat else 0.0,
            "round_latency_sum_s": sum(lat),
            "prompt_tokens": prompt,
            "shared_tokens": sum(r.shared_tokens for r in self.rounds),
            "cached_tokens": cached,
            "uncached_tokens": prompt - cached,
            "cache_hit_rate": cached / prompt if prompt else 0.0,
            "generated_tokens": gen,
            "prompt_tokens_per_s": prompt / sum(lat) if sum(lat) > 0 else 0.0,
        }

    def to_json(self, *, include_ids: bool = True, include_prompts: bool = False) -> dict[str, Any]:
        """A JSON-serialisable record. ``include_ids``: outputs' token ids; ``include_prompts``: input ids, segment
        tables and meta_info of every request (large)."""
        rounds = []
        for r in self.rounds:
            d = r.summary()
            agents = []
            for a in r.agents:
                ad = {
                    "agent": a.agent,
                    "prompt_tokens": a.prompt_tokens,
                    "server_prompt_tokens": a.server_prompt_tokens,
                    "cached_tokens": a.cached_tokens,
                    "shared_tokens": a.shared_tokens,
                    "generated_tokens": a.generated_tokens,
                    "latency_s": a.latency_s,
                    "finish_reason": a.finish_reason,
                    "text": a.text,
                }
                if include_ids:
                    ad["output_ids"] = list(a.output_ids)
                    ad["segment_ids"] = list(a.segment_ids)
                if include_prompts:
                    ad["input_ids"] = list(a.input_ids)
                    ad["segments"] = [list(s) for s in a.segments]
                    ad["custom_params"] = a.custom_params
                    ad["meta_info"] = a.meta_info
                agents.append(ad)
            d["agents"] = agents
            rounds.append(d)
        return {
            "base_url": self.base_url,
            "workload": self.workload,
            "settings": self.settings,
            "summary": self.summary(),
            "rounds": rounds,
        }

    def outputs(self, round_: int) -> dict[int, list[int]]:
        """Raw output ids of every agent in a round (its last turn)."""
        rec = [r for r in self.rounds if r.round == round_][-1]
        return {a.agent: list(a.output_ids) for a in rec.agents}


# --------------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------------

_local = threading.local()


def _session() -> requests.Session:
    s = getattr(_local, "session", None)
    if s is None:
        s = requests.Session()
        _local.session = s
    return s


def wait_for_server(base_url: str, timeout: float = 300.0, interval: float = 1.0) -> None:
    """Block until ``GET /health`` answers 200 (raises :class:`ServerError` after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(base_url.rstrip("/") + "/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = e
        time.sleep(interval)
    raise ServerError(f"server at {base_url} not healthy after {timeout:.0f}s (last: {last})")


def flush_cache(base_url: str) -> None:
    """``POST /flush_cache`` (empties the server's prefix cache; the server refuses while requests run)."""
    r = requests.post(base_url.rstrip("/") + "/flush_cache", timeout=60)
    if r.status_code >= 400:
        raise ServerError(f"POST /flush_cache -> HTTP {r.status_code}: {r.text[:2000]}")


def _post_generate(base_url: str, payload: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    url = base_url.rstrip("/") + "/generate"
    t0 = time.perf_counter()
    try:
        resp = _session().post(url, json=payload, timeout=timeout)
    except requests.RequestException as e:
        raise ServerError(f"POST {url} failed: {e}") from e
    dt = time.perf_counter() - t0
    if resp.status_code >= 400:
        raise ServerError(f"POST {url} -> HTTP {resp.status_code}: {resp.text[:4000]}")
    try:
        body = resp.json()
    except ValueError as e:
        raise ServerError(f"POST {url} returned non-JSON: {resp.text[:2000]}") from e
    if isinstance(body, list):  # a batch answer; we send single requests
        if len(body) != 1:
            raise ServerError(f"POST {url}: expected one result, got {len(body)}")
        body = body[0]
    if not isinstance(body, dict):
        raise ServerError(f"POST {url}: unexpected response {str(body)[:2000]}")
    if "error" in body and "meta_info" not in body:
        raise ServerError(f"POST {url}: server error: {json.dumps(body)[:4000]}")
    if "output_ids" not in body:
        raise ServerError(
            f"POST {url}: the response has no 'output_ids' (keys: {sorted(body)}); the runner needs the exact "
            f"generated token ids (SGLang returns them for non-streaming /generate requests)"
        )
    if "meta_info" not in body:
        raise ServerError(f"POST {url}: the response has no 'meta_info' (keys: {sorted(body)})")
    return body, dt


# --------------------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------------------


def _progress_printer(stream: Any = None) -> Callable[[str], None]:
    out = stream or sys.stderr

    def _p(msg: str) -> None:
        print(f"[run-workload] {msg}", file=out, flush=True)

    return _p


def _run_step(pool, base_url: str, workload: Workload, r: int, t: int, reqs: list[AgentRequest],
              payloads: list[dict[str, Any]], timeout: float, keep_prompts: bool) -> RoundRecord:
    """Sends one turn of one round (every agent at once) and waits for the last answer."""
    t0 = time.perf_counter()
    futures = [pool.submit(_post_generate, base_url, p, timeout) for p in payloads]
    results, errors = [], []
    for f in futures:
        try:
            results.append(f.result())
        except Exception as e:  # collect so the barrier holds; raise after the round
            errors.append(e)
            results.append(None)
    latency = time.perf_counter() - t0
    if errors:
        raise errors[0]
    agents = []
    for q, (body, dt) in zip(reqs, results):
        meta = body.get("meta_info") or {}
        out_ids = [int(x) for x in body["output_ids"]]
        agents.append(
            AgentRecord(
                agent=q.agent,
                prompt_tokens=len(q.input_ids),
                server_prompt_tokens=int(meta.get("prompt_tokens", len(q.input_ids))),
                cached_tokens=int(meta.get("cached_tokens", 0) or 0),
                shared_tokens=q.shared_tokens,
                generated_tokens=int(meta.get("completion_tokens", len(out_ids))),
                latency_s=dt,
                finish_reason=meta.get("finish_reason"),
                output_ids=out_ids,
                segment_ids=workload.clean(out_ids),
                text=body.get("text") if body.get("text") is not None else workload.tokenizer.decode(out_ids),
                input_ids=list(q.input_ids) if keep_prompts else [],
                segments=list(q.segments) if keep_prompts else [],
                custom_params=dict(q.custom_params) if keep_prompts else {},
                meta_info=meta if keep_prompts else {},
            )
        )
    return RoundRecord(round=r, latency_s=latency, agents=agents, turn=t)


def run_workload(
    base_url: str,
    workload: Workload,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    concurrency: int | None = None,
    return_logprob: bool = False,
    extra_sampling: dict[str, Any] | None = None,
    timeout: float = 1800.0,
    flush_first: bool = False,
    progress: bool | Callable[[str], None] = True,
    keep_prompts: bool = True,
    payload_hook: Callable[[AgentRequest, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run every round of ``workload`` against the server at ``base_url``.

    All agents of a round are sent concurrently (``concurrency`` threads; default: one per agent), and the next
    round starts only when the last response of this one arrived.  ``max_new_tokens`` overrides the workload's
    default; ``extra_sampling`` is merged into every request's ``sampling_params`` (e.g. ``{"ignore_eos": True}``).
    ``flush_first`` empties the server's cache before round 0.  ``progress``: True prints a line per round to
    stderr, a callable receives the lines, False is silent.  ``payload_hook(request, payload)`` may edit each
    ``/generate`` body in place before it is sent (e.g. add ``custom_params`` keys or logprob options).  Raises :class:`ServerError` on any HTTP error (with
    the body) or a response without ``output_ids``.
    """
    log: Callable[[str], None]
    if progress is True:
        log = _progress_printer()
    elif callable(progress):
        log = progress
    else:
        log = lambda _msg: None  # noqa: E731

    n = workload.n_agents
    workers = max(1, min(int(concurrency or n), n))
    mnt = int(max_new_tokens if max_new_tokens is not None else workload.max_new_tokens)
    overrides: dict[str, Any] = {"max_new_tokens": mnt, "temperature": float(temperature)}
    if extra_sampling:
        overrides.update(extra_sampling)
    settings = {
        "max_new_tokens": mnt,
        "temperature": float(temperature),
        "concurrency": workers,
        "return_logprob": bool(return_logprob),
        "extra_sampling": dict(extra_sampling or {}),
        "flush_first": bool(flush_first),
    }
    if flush_first:
        flush_cache(base_url)

    rounds: list[RoundRecord] = []
    prev: dict[int, list[int]] | None = None
    t_start = time.perf_counter()
    log(
        f"{workload.style}: {n} agents x {workload.n_rounds} rounds, seed {workload.seed}, order {workload.order}, "
        f"max_new_tokens {mnt}, against {base_url}"
    )
    turns = int(getattr(workload, "turns", 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="td-agent") as pool:
        for r in range(workload.n_rounds):
            outs: dict[int, list[int]] | None = None
            for t in range(turns):
                reqs: list[AgentRequest] = workload.build_round(r, prev) if t == 0 else workload.build_turn(r, t, outs)
                payloads = []
                for q in reqs:
                    p = q.payload(**overrides)
                    if return_logprob:
                        p["return_logprob"] = True
                    if payload_hook is not None:
                        payload_hook(q, p)
                    payloads.append(p)
                rec = _run_step(pool, base_url, workload, r, t, reqs, payloads, timeout, keep_prompts)
                rounds.append(rec)
                log(
                    f"round {r}{f' turn {t}' if turns > 1 else ''}: {rec.latency_s:.2f}s, prompt {rec.prompt_tokens} "
                    f"tok (shared {rec.shared_tokens}), cached {rec.cached_tokens}, generated {rec.generated_tokens}"
                )
                outs = {a.agent: a.output_ids for a in rec.agents}
            prev = outs
    total = time.perf_counter() - t_start
    return RunResult(base_url=base_url, workload=workload.describe(), settings=settings, rounds=rounds, total_s=total)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def format_table(result: RunResult, *, show_outputs: bool = False, width: int = 100) -> str:
    """A plain-text per-round table and a summary."""
    headers = ["round", "agents", "latency_s", "prompt_tok", "shared_tok", "cached_tok", "cached%", "uncached",
               "gen_tok", "req_mean_s", "req_max_s"]
    rows = []
    w = result.workload
    for r in result.rounds:
        lat = [a.latency_s for a in r.agents]
        rows.append([
            f"{r.round}.{r.turn}" if w.get("turns", 1) > 1 else str(r.round),
            str(r.n_agents),
            f"{r.latency_s:.2f}",
            str(r.prompt_tokens),
            str(r.shared_tokens),
            str(r.cached_tokens),
            f"{100.0 * r.cached_tokens / r.prompt_tokens:.1f}" if r.prompt_tokens else "-",
            str(r.uncached_tokens),
            str(r.generated_tokens),
            f"{statistics.fmean(lat):.2f}" if lat else "-",
            f"{max(lat):.2f}" if lat else "-",
        ])
    s = result.summary()
    lines = [
        f"workload: {w.get('style')}  agents={w.get('n_agents')}  rounds={w.get('n_rounds')}  seed={w.get('seed')}  "
        f"order={w.get('order')}  max_new_tokens={result.settings.get('max_new_tokens')}  server={result.base_url}",
        _table(headers, rows),
        "",
        "summary: "
        f"total {s['total_s']:.2f}s | round latency mean {s['round_latency_mean_s']:.2f}s max "
        f"{s['round_latency_max_s']:.2f}s | prompt {s['prompt_tokens']} tok, shared {s['shared_tokens']}, "
        f"cached {s['cached_tokens']} ({100 * s['cache_hit_rate']:.1f}%), uncached {s['uncached_tokens']} | "
        f"generated {s['generated_tokens']} tok",
    ]
    if show_outputs:
        for r in result.rounds:
            lines.append(f"\nround {r.round} outputs:")
            for a in r.agents:
                t = " ".join(a.text.split())
                if len(t) > width:
                    t = t[: width - 3] + "..."
                lines.append(f"  a{a.agent}: {t}")
    return "\n".join(lines)


__all__ = [
    "AgentRecord",
    "RoundRecord",
    "RunResult",
    "ServerError",
    "flush_cache",
    "format_table",
    "run_workload",
    "wait_for_server",
]
