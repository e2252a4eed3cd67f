"""`tokendance-sgl demo`, `run-workload` and `bench`.

The demo starts one SGLang server per KV backend (radix, pic, tokendance) on the default model, drives the same seeded
GenerativeAgents-like workload through each (4 agents x 3 rounds; by default the history workload, where every agent
keeps its whole chat history and each round appends everyone's last answers) and prints, round by round and side by
side: prompt tokens cached and computed, selection-probe tokens, KV per agent, round latency, and fidelity against
exact prefill of the same prompts (a fourth server: radix with the prefix cache disabled).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from tokendance_sgl.patches.kv_backend import IMPLEMENTED

REPO = Path(__file__).resolve().parent.parent
DEMO_POLICY = "sink:2+deviation:0.1"
RESULTS = REPO / "benchmarks" / "results"


def _workload(args):
    from tokendance_sgl.history import HistoryWorkload
    from tokendance_sgl.workloads import make_workload

    kw = dict(n_agents=args.agents, n_rounds=args.rounds, seed=args.seed, tokenizer=args.model,
              max_new_tokens=args.max_new_tokens)
    if getattr(args, "workload", "last-round") == "history":
        return HistoryWorkload(args.style, turns=args.turns, **kw)
    return make_workload(args.style, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--style", default="generative_agents", help="generative_agents (ga) or agent_society (as)")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2)")
    p.add_argument("--json", default=None, help="write the full result as JSON to this file")
    p.add_argument("--workload", choices=["history", "last-round"], default="history",
                   help="history: every agent keeps its whole chat history (default); last-round: a private part, "
                   "the last round's block and a task")
    p.add_argument("--turns", type=int, default=1, help="history workload: assistant turns per round (1 or 2)")


def _cmd_run_workload(args) -> int:
    from tokendance_sgl.runner import format_table, run_workload

    result = run_workload(args.url, _workload(args), max_new_tokens=args.max_new_tokens, flush_first=args.flush)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
    return 0


TOP_K = 20  # top logprobs compared against exact prefill


def _logprob_hook(q, payload) -> None:
    """Score the task tokens (teacher-forced fidelity) of every request."""
    payload.update(return_logprob=True, logprob_start_len=len(q.input_ids) - q.task_tokens, top_logprobs_num=TOP_K)


def score_against_exact(exact_url: str, result, max_new_tokens: int) -> list[dict]:
    """Per round: the same prompts prefilled exactly (no prefix cache, true positions) on ``exact_url``; fidelity of
    ``result``'s responses against them (:func:`tokendance_sgl.fidelity.compare_responses`)."""
    from concurrent.futures import ThreadPoolExecutor

    from tokendance_sgl.fidelity import compare_responses
    from tokendance_sgl.runner import _post_generate

    out = []
    for r in result.rounds:
        payloads = [{"input_ids": list(a.input_ids), "sampling_params": a.meta_info["_sampling"],
                     "return_logprob": True, "logprob_start_len": a.meta_info["_logprob_start"],
                     "top_logprobs_num": TOP_K} for a in r.agents]
        with ThreadPoolExecutor(len(payloads)) as pool:
            refs = [b for b, _ in pool.map(lambda p: _post_generate(exact_url, p, 1800.0), payloads)]
        gots = [{"output_ids": a.output_ids, "meta_info": a.meta_info} for a in r.agents]
        out.append(compare_responses(refs, gots, n=max_new_tokens).as_dict())
    return out


def kv_per_agent(result, stats: dict) -> list[float]:
    """KV bytes per agent and round (docs/architecture.md, "Metrics"). tokendance / pic: the rows' slots at release, masters divided
    among the rows sharing them (``/tokendance/stats``); radix: every slot of a row is the agent's own (prompt +
    output)."""
    per_tok = stats.get("kv_bytes_per_token", 0.0)
    by_round = stats.get("kv_per_agent_by_round")
    if by_round is not None:
        return [by_round.get(str(r.round), {}).get("bytes", 0.0) for r in result.rounds]
    # radix: a row holds its whole prompt and output
    return [(r.prompt_tokens + r.generated_tokens) / max(1, r.n_agents) * per_tok for r in result.rounds]


def _cmd_demo(args) -> int:
    from tokendance_sgl.model import prepare_model
    from tokendance_sgl.runner import format_table, run_workload
    from tokendance_sgl.server import launch

    args.model = args.model or prepare_model()
    backends = args.backends or list(IMPLEMENTED)
    policy = ["--td-recompute", args.recompute]
    runs: dict = {}
    print(f"=== exact reference (radix, prefix cache disabled): starting on {args.model} ...", flush=True)
    with launch(args.model, kv_backend="radix", extra_args=["--disable-radix-cache"]) as exact:
        for backend in backends:
            print(f"\n=== kv-backend {backend}" + (f" ({args.recompute})" if backend != "radix" else "")
                  + ": starting the SGLang server ...", flush=True)
            t0 = time.monotonic()
            with launch(args.model, kv_backend=backend, extra_args=policy if backend != "radix" else []) as server:
                print(f"    server ready in {time.monotonic() - t0:.0f}s at {server.base_url}", flush=True)
                starts: dict = {}

                def hook(q, p):
                    _logprob_hook(q, p)
                    sampling = {k: v for k, v in p["sampling_params"].items() if k != "custom_params"}
                    starts[(q.round, getattr(q, "turn", 0), q.agent)] = (p["logprob_start_len"], sampling)

                result = run_workload(server.base_url, _workload(args), max_new_tokens=args.max_new_tokens,
                                      payload_hook=hook)
                stats = requests.get(server.base_url + "/tokendance/stats", timeout=120).json()
            for r in result.rounds:
                for a in r.agents:
                    a.meta_info["_logprob_start"], a.meta_info["_sampling"] = starts[(r.round, r.turn, a.agent)]
            print(format_table(result))
            fid = score_against_exact(exact.base_url, result, args.max_new_tokens)
            runs[backend] = {"result": result, "stats": stats, "fidelity": fid, "kv": kv_per_agent(result, stats)}
            if args.json:
                path = Path(args.json)
                path.with_name(f"{path.stem}_{backend}{path.suffix}").write_text(json.dumps(
                    {**result.to_json(), "stats": stats, "fidelity": fid}, indent=1))
    print(side_by_side(runs, args))
    return 0


def side_by_side(runs: dict, args) -> str:
    """The per-round comparison table and a short summary."""
    head = (f"{'round':>5} {'backend':>10} {'cached tok':>10} {'computed tok':>12} {'probe tok':>9} {'KV/agent MB':>11} "
            f"{'latency s':>9} {'top-1':>6} {'KL':>7} {'greedy':>6}")
    lines = ["", f"=== side by side: {args.workload} workload, {args.agents} agents x {args.rounds} rounds"
             f"{f' x {args.turns} turns' if args.turns > 1 else ''}, {args.max_new_tokens} new tokens, policy "
             f"{args.recompute} (pic, tokendance); fidelity against exact prefill of the same prompts", head,
             "-" * len(head)]
    n_rounds = min(len(v["result"].rounds) for v in runs.values())
    for i in range(n_rounds):
        for backend, v in runs.items():
            r = v["result"].rounds[i]
            pf = v["stats"].get("prefill_by_round", {}).get(str(r.round), {})
            f = v["fidelity"][i]
            label = f"{r.round}.{r.turn}" if args.turns > 1 else str(r.round)
            probe = pf.get("probe_tokens", 0) if r.turn == 0 else 0
            lines.append(f"{label:>5} {backend:>10} {r.cached_tokens:>10} {r.uncached_tokens:>12} {probe:>9} "
                         f"{v['kv'][i] / 2**20:>11.2f} {r.latency_s:>9.2f} {f['top1']:>6.3f} {f['kl']:>7.4f} "
                         f"{f['greedy']:>6.2f}")
    lines.append("")
    base = runs.get("radix")
    for backend, v in runs.items():
        s = v["stats"]
        later = v["kv"][1:] or v["kv"]
        kv = sum(later) / len(later)
        msg = f"{backend:>10}: KV per agent (rounds >= 1) {kv / 2**20:.2f} MB"
        if base is not None and backend != "radix":
            bkv = sum(base["kv"][1:] or base["kv"]) / len(base["kv"][1:] or base["kv"])
            msg += f" ({bkv / kv:.2f}x less than radix)"
        if "reused_tokens" in s:
            msg += (f"; {s['reused_tokens']} shared-block tokens read from masters, {s['recomputed_tokens']} "
                    f"recomputed, selection probes {s['probe_tokens']} tokens ({s['selections']} measured, "
                    f"{s['selections_shared']} reused from the round), {s['master_copies']} re-rotated master copies")
        lines.append(msg)
    return "\n".join(lines)


def shared_tokens_in_cached_prefix(result) -> int:
    """Shared-block tokens that a prefix cache could have served: those inside each request's cached prefix."""
    return sum(
        max(0, min(end, a.cached_tokens) - start)
        for r in result.rounds
        for a in r.agents
        for _seg, start, end in a.segments
    )


def _cmd_bench(args) -> int:
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    scripts = [s for s in scripts if not s.name.startswith("_")]
    if not scripts:
        print("no benchmark scripts yet")
        return 0
    failures = []
    for i, script in enumerate(scripts, 1):
        print(f"\n[{i}/{len(scripts)}] {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script), "--quick"], cwd=REPO)
        if code:
            failures.append(script.name)
    print(f"\nbenchmarks: {len(scripts) - len(failures)} ran, {len(failures)} failed {failures or ''}; results in {RESULTS}")
    return 1 if failures else 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the All-Gather workload on each KV backend and compare")
    _common(p)
    p.add_argument("--backends", nargs="*", choices=["radix", "pic", "tokendance"], default=None)
    p.add_argument("--recompute", default=DEMO_POLICY, help=f"recompute policy of pic and tokendance ({DEMO_POLICY})")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run-workload", help="drive a workload against a running server")
    _common(p)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--flush", action="store_true", help="flush the server's cache first")
    p.set_defaults(func=_cmd_run_workload)

    p = sub.add_parser("bench", help="run the CPU-sized benchmarks under benchmarks/")
    p.set_defaults(func=_cmd_bench)
