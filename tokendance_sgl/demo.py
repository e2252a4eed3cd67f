"""`tokendance-sgl demo`, `run-workload` and `bench`.

The demo starts one SGLang server per KV backend on the default model, drives the same seeded
GenerativeAgents-like All-Gather workload through each (4 agents x 3 rounds) and prints the per-round table and
a summary side by side.
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
RESULTS = REPO / "benchmarks" / "results"


def _workload(args):
    from tokendance_sgl.workloads import make_workload

    return make_workload(
        args.style, n_agents=args.agents, n_rounds=args.rounds, seed=args.seed, tokenizer=args.model,
        max_new_tokens=args.max_new_tokens,
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--style", default="generative_agents", help="generative_agents (ga) or agent_society (as)")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2)")
    p.add_argument("--json", default=None, help="write the full result as JSON to this file")


def _cmd_run_workload(args) -> int:
    from tokendance_sgl.runner import format_table, run_workload

    result = run_workload(args.url, _workload(args), max_new_tokens=args.max_new_tokens, flush_first=args.flush)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
    return 0


def _cmd_demo(args) -> int:
    from tokendance_sgl.model import prepare_model
    from tokendance_sgl.runner import format_table, run_workload
    from tokendance_sgl.server import launch

    args.model = args.model or prepare_model()
    backends = args.backends or list(IMPLEMENTED)
    summaries = {}
    for backend in backends:
        print(f"\n=== kv-backend {backend}: starting the SGLang server on {args.model} ...", flush=True)
        t0 = time.monotonic()
        with launch(args.model, kv_backend=backend) as server:
            print(f"    server ready in {time.monotonic() - t0:.0f}s at {server.base_url}", flush=True)
            result = run_workload(server.base_url, _workload(args), max_new_tokens=args.max_new_tokens)
            stats = requests.get(server.base_url + "/tokendance/stats", timeout=120).json()
        print(format_table(result))
        summaries[backend] = result.summary()
        summaries[backend]["shared_tokens_in_cached_prefix"] = shared_tokens_in_cached_prefix(result)
        if "reused_tokens" in stats:
            summaries[backend]["tokendance"] = {k: stats[k] for k in _TD_STATS}
            print(
                f"tokendance ({stats['recompute_policy']}): {stats['reused_tokens']} shared-block tokens read from "
                f"shared masters, {stats['recomputed_tokens']} recomputed in context, {stats['prepass_text_tokens']} "
                f"text tokens between segments computed, {stats['master_copies']} re-rotated master copies "
                f"({stats['rotated_tokens']} tokens)"
            )
        if args.json:
            path = Path(args.json)
            path.with_name(f"{path.stem}_{backend}{path.suffix}").write_text(json.dumps(result.to_json(), indent=1))

    print("\n=== summary (same seeded workload on every backend)")
    cols = ["prompt_tokens", "shared_tokens", "cached_tokens", "uncached_tokens", "cache_hit_rate", "round_latency_mean_s"]
    print(f"{'backend':<12}" + "".join(f"{c:>22}" for c in cols))
    for backend, s in summaries.items():
        cells = "".join(f"{s[c]:>22.3f}" if isinstance(s[c], float) else f"{s[c]:>22}" for c in cols)
        print(f"{backend:<12}{cells}")
    radix = summaries.get("radix")
    if radix:
        print(
            f"\nradix: {radix['shared_tokens']} prompt tokens sat in the agents' shared All-Gather blocks and "
            f"{radix['shared_tokens_in_cached_prefix']} of them fell inside a cached prefix: the {radix['cached_tokens']} "
            "cached tokens are each agent's own private prefix, so every agent recomputed and stored its own copy of "
            "the shared block."
        )
    return 0


_TD_STATS = ("recompute_policy", "rows_composed", "reused_tokens", "recomputed_tokens", "prepass_text_tokens",
             "master_copies", "rotated_tokens", "load_back_fallbacks")


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
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run-workload", help="drive a workload against a running server")
    _common(p)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--flush", action="store_true", help="flush the server's cache first")
    p.set_defaults(func=_cmd_run_workload)

    p = sub.add_parser("bench", help="run the CPU-sized benchmarks under benchmarks/")
    p.set_defaults(func=_cmd_bench)
