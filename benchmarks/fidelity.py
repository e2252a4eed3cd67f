"""Fidelity of approximate KV reuse against exact prefill, per recompute policy and per round: the quality-cost curve.

    python benchmarks/fidelity.py [--quick] [--backends pic tokendance] [--policies none sink:4 sink:16 full]
                                  [--agents 4] [--rounds 3]

Reference: exact prefill on ``--kv-backend radix --disable-radix-cache`` (no prefix cache, true positions), one
server alive through the run.  On every reuse backend (one server each) each policy gets a free-running run of its
own: the seeded GenerativeAgents-like workload (N agents, R rounds, greedy, fixed-length answers, each agent keeping
its whole history) with ``custom_params["td_recompute"]`` on every request, outputs registered as segments as usual.
Every round's prompts, as the backend built them, also go to the exact server; from round 1 on both return the
prompt logprobs of each request's task text (teacher forcing, top-k per position).  The approximate KV an agent's
cached path carries from round to round is thus in the measurement: drift shows as quality falling with the round.

Quality (``tokendance_sgl.fidelity``), per round: teacher-forced top-1 agreement and mean truncated KL(exact || reuse)
over the task positions (primary), greedy agreement of the first ``--probe-tokens`` generated tokens (secondary),
and the first round whose greedy outputs differ from exact's on the same prompts: the round at which the run
leaves the exact trace (up to it every output, hence every next prompt, is the exact run's).
Cost: the fraction of the shared-block tokens recomputed (``/tokendance/stats`` counters ``recomputed_tokens`` /
(``reused_tokens`` + ``recomputed_tokens``) over the round) and the round's uncached tokens (meta_info
prompt_tokens - cached_tokens).  A policy a backend refuses (HTTP 400) is recorded as such.  The headline numbers
of a policy (``results[backend]["policies"][policy]``) are its last round's; ``by_round`` holds every round's.

tokendance aligns every agent's shared block at a canonical base (a hole of up to ``--td-max-gap`` positions, 64 by
default, before it); pic keeps true positions.  ``--max-gaps`` adds tokendance servers with smaller gaps (0: true
positions, one master copy per distinct start), so the position gap's share of the fidelity difference, and the
master copies it saves (``copy_slots_made``: K/V slots re-rotated into copies over the policy's run), are measured
in the same run.
Writes benchmarks/results/fidelity[_quick].json and .png.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "fidelity"
REUSE_BACKENDS = ("pic", "tokendance")
QUICK_POLICIES = ["none", "sink:4", "sink:2+deviation:0.1", "full"]
FULL_POLICIES = ["none", "sink:2", "sink:8", "sink:32", "deviation:0.1", "deviation:0.2", "deviation:0.4",
                 "sink:2+deviation:0.1", "full"]
STATS_KEYS = ("reused_tokens", "recomputed_tokens", "prepass_text_tokens", "rotated_tokens", "master_copies",
              "probe_tokens", "probe_token_layers", "selections", "selections_shared", "probe_no_room")
EQUAL_BUDGET = 0.02  # recomputed fractions of the block within this of each other count as the same budget
QUICK_MAX_GAPS = [0]
FULL_MAX_GAPS = [0, 16]


def parse_args(argv=None):
    p = C.base_parser(__doc__, default_backends=REUSE_BACKENDS)
    p.add_argument("--policies", nargs="+", default=None,
                   help=f"recompute policies, sent per request (default {' '.join(FULL_POLICIES)}; --quick: "
                        f"{' '.join(QUICK_POLICIES)})")
    p.add_argument("--agents", type=int, default=None, help="N (default 8; --quick: 4)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, every one from 1 on probed (default 4; --quick: 3)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens of every round = segment length (default 64; --quick: 16)")
    p.add_argument("--probe-tokens", type=int, default=None,
                   help="greedy tokens compared per round (default and at most: the answer length)")
    p.add_argument("--top-k", type=int, default=20, help="top logprobs per teacher-forced position")
    p.add_argument("--max-gaps", type=int, nargs="*", default=None,
                   help="extra tokendance servers with --td-max-gap G (the default server uses 64): the position gap "
                        "of the aligned layout traded for master copies (default 0 16; --quick: 0)")
    p.add_argument("--pool", type=int, default=None,
                   help="--max-total-tokens of every server (default 65536; --quick: 16384): the reuse backends must "
                        "hold every agent's history, or evictions and probes without room change what they recompute")
    a = p.parse_args(argv)
    a.pool = a.pool or (16384 if a.quick else 65536)
    a.max_gaps = a.max_gaps if a.max_gaps is not None else (QUICK_MAX_GAPS if a.quick else FULL_MAX_GAPS)
    a.policies = a.policies or (QUICK_POLICIES if a.quick else FULL_POLICIES)
    a.agents = a.agents or (4 if a.quick else 8)
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 64)
    a.rounds = a.rounds or (3 if a.quick else 4)
    a.probe_tokens = min(a.probe_tokens or a.max_new_tokens, a.max_new_tokens)
    a.backends = [b for b in a.backends if b in REUSE_BACKENDS] or list(REUSE_BACKENDS)
    if a.rounds < 2:
        p.error("--rounds must be >= 2")
    return a


def post_round(url: str, payloads: list[dict]) -> tuple[list[dict], float]:
    from tokendance_sgl.runner import _post_generate

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(payloads)) as pool:
        bodies = [b for b, _ in pool.map(lambda p: _post_generate(url, p, 3600.0), payloads)]
    return bodies, time.perf_counter() - t0


def logprob_options(args, q) -> dict:
    """Teacher forcing over the request's task text (rounds >= 1: round 0 has no shared block)."""
    if q.round < 1:
        return {}
    return {"return_logprob": True, "logprob_start_len": len(q.input_ids) - q.task_tokens, "top_logprobs_num": args.top_k}


def exact_payload(p: dict) -> dict:
    """The same request for the exact server: no recompute policy (radix has none)."""
    p = copy.deepcopy(p)
    p["sampling_params"].get("custom_params", {}).pop("td_recompute", None)
    return p


def counters(stats: dict) -> dict:
    return {k: stats.get(k, 0) for k in STATS_KEYS if k in stats}


def probe_policy(args, srv, exact, policy: str) -> dict:
    """One free-running run of every round with ``policy`` on ``srv``; every round's prompts also go to the exact
    server.  The last round's record, with ``by_round`` (rounds 1..R-1) and the first round whose greedy outputs
    differ from exact's on the same prompts (None: none did)."""
    from tokendance_sgl.fidelity import compare_responses

    w = C.make_workload(args, args.agents, args.rounds, args.max_new_tokens)
    sent: dict[tuple[int, int], dict] = {}

    def hook(q, p):
        p.update(logprob_options(args, q))
        p["sampling_params"].setdefault("custom_params", {})["td_recompute"] = policy
        sent[(q.round, q.agent)] = copy.deepcopy(p)

    before = counters(srv.stats())  # run_rounds flushes first, which keeps the counters
    run = C.run_rounds(srv, w, max_new_tokens=args.max_new_tokens, payload_hook=hook)
    res = run["_result"]
    by_round, left = [], None
    for rec, mark in zip(res.rounds, run["rounds"]):
        r = rec.round
        after = counters(mark["stats_after"])
        d = {k: after[k] - before.get(k, 0) for k in after}
        before = after
        got = [{"output_ids": a.output_ids, "meta_info": a.meta_info} for a in rec.agents]
        ref, _ = post_round(exact.url, [exact_payload(sent[(r, a.agent)]) for a in rec.agents])
        same = [x["output_ids"] == y["output_ids"] for x, y in zip(ref, got)]
        if left is None and not all(same):
            left = r
        if r == 0:
            continue
        seg = d.get("reused_tokens", 0) + d.get("recomputed_tokens", 0)
        by_round.append({
            "round": r, **compare_responses(ref, got, n=args.probe_tokens).as_dict(),
            "first_divergence": [first_divergence(x["output_ids"], y["output_ids"], args.probe_tokens)
                                 for x, y in zip(ref, got)],
            "outputs_match_exact": sum(same) / len(same),
            "recompute_fraction": (d["recomputed_tokens"] / seg) if seg else None,
            "stats_delta": d,
            "shared_tokens": sum(a.shared_tokens for a in rec.agents),
            "prompt_tokens": sum(a.meta_info["prompt_tokens"] for a in rec.agents),
            "uncached_tokens": sum(a.meta_info["prompt_tokens"] - a.meta_info.get("cached_tokens", 0)
                                   for a in rec.agents),
            "round_latency_s": mark["latency_s"],
        })
    total = {k: sum(x["stats_delta"].get(k, 0) for x in by_round) for k in ("rotated_tokens", "master_copies")}
    return {**by_round[-1], "first_divergent_round": left, "copy_slots": total["rotated_tokens"],
            "master_copies": total["master_copies"], "by_round": by_round}


def _diverged(rec: dict) -> str:
    return "none" if rec["first_divergent_round"] is None else str(rec["first_divergent_round"])


def first_divergence(ref: list[int], got: list[int], n: int) -> int | None:
    for i, (a, b) in enumerate(zip(ref[:n], got[:n])):
        if a != b:
            return i
    return None if len(got) >= min(n, len(ref)) else min(len(ref), len(got))


def probe_backend(args, backend: str, exact, log, extra: list[str] | None = None) -> dict:
    from tokendance_sgl.runner import ServerError

    out: dict = {"policies": {}}
    with C.server(args, backend, log, extra=["--max-total-tokens", str(args.pool), *(extra or [])]) as srv:
        out["server"] = srv.info
        for pol in C.progress(args.policies, desc=f"fidelity {backend}"):
            try:
                rec = probe_policy(args, srv, exact, pol)
            except ServerError as e:
                out["policies"][pol] = {"error": str(e)[:500]}
                log(f"  {backend} {pol}: refused ({str(e)[:160]})")
                continue
            out["policies"][pol] = rec
            per = ", ".join(f"r{x['round']} {x['top1']:.3f}/{x['kl']:.4f}" for x in rec["by_round"])
            div = rec["first_divergent_round"]
            log(f"  {backend} {pol}: top-1/KL {per}; recomputed {C.fmt(rec['recompute_fraction'], 3)} of the segment "
                f"tokens in the last round; greedy outputs {'never differ' if div is None else f'first differ in round {div}'}")
        # the memory side of the position gap: master copies re-rotated over each policy's run (one per segment
        # and base); the policies' runs are alike, so the first one's count stands for the server
        done = [x for x in out["policies"].values() if "by_round" in x]
        out["master_copies_made"] = done[0]["master_copies"] if done else None
        out["copy_slots_made"] = done[0]["copy_slots"] if done else None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    env = C.environment()
    backends, skipped = C.resolve_backends(args.backends, log)
    C.model_path(args)
    log(f"exact prefill (radix --disable-radix-cache) scores every round; backends {backends}; policies {args.policies}; "
        f"{args.agents} agents x {args.rounds} rounds (rounds 1..{args.rounds - 1} probed), segments of "
        f"{args.max_new_tokens} tokens, workload sizes {C.workload_sizes(args) or 'default'}")
    results = {}
    runs = [(b, b, None) for b in backends]
    if "tokendance" in backends:
        runs += [(f"tokendance --td-max-gap {g}", "tokendance", ["--td-max-gap", str(g)]) for g in args.max_gaps]
    exact_flags = ["--disable-radix-cache", "--max-total-tokens", str(args.pool)]
    with C.server(args, "radix", log, extra=exact_flags) as exact:
        for label, b, extra in runs:
            try:
                results[label] = probe_backend(args, b, exact, log, extra)
            except Exception as e:  # noqa: BLE001  (a backend that fails is reported, the others still run)
                C.backend_failed(label, e, skipped, log)
        exact_info = exact.info

    comparison = against_pic(results, "tokendance", args.policies)
    comparison_max_gap = {label: against_pic(results, label, args.policies) for label, _, extra in runs if extra}

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "settings": {
            "backends": backends, "skipped_backends": skipped, "policies": args.policies, "agents": args.agents,
            "rounds": args.rounds, "probed_round": args.rounds - 1, "segment_tokens_max": args.max_new_tokens,
            "probe_tokens": args.probe_tokens, "top_k": args.top_k, "workload": args.workload, "style": args.style,
            "seed": args.seed,
            "workload_sizes": C.workload_sizes(args) or "workload defaults", "model": args.model,
            "server_args": args.server_arg, "max_gaps": args.max_gaps, "pool_tokens": args.pool,
            "reference": "radix --disable-radix-cache (exact prefill at true positions)",
            "quality": "top1, kl: teacher-forced over each request's task tokens (KL over the reference's top-k); "
                       "greedy: fraction of the first probe_tokens generated before the first divergence; "
                       "first_divergent_round: the first round whose greedy outputs differ from exact (a free-running "
                       "greedy run leaves the exact trace there); headline = last round, by_round = rounds 1..R-1",
            "cost": "recompute_fraction = recomputed / (reused + recomputed) segment tokens from /tokendance/stats; "
                    "uncached_tokens from meta_info",
        },
        "reference": {"server": exact_info},
        "results": results,
        "comparison": comparison,
        "comparison_max_gap": comparison_max_gap,
        "environment": {**env, "loadavg_at_end": list(os.getloadavg())},
    }
    paths = [C.write_json(C.out_name(NAME, args), args.quick, data, args.out_dir)]
    if not args.no_plot and results:
        paths.append(plot(data, args))

    print(f"\n=== fidelity against exact prefill, {args.agents} agents, rounds 1..{args.rounds - 1}, "
          f"{'quick' if args.quick else 'full'} size")
    w = max([8] + [len(p) + 2 for p in args.policies])
    wb = max([12] + [len(b) + 2 for b in results])
    print(f"{'backend':<{wb}}{'policy':<{w}}{'round':>6}{'recomputed':>11}{'top-1':>8}{'KL':>9}{'greedy':>8}"
          f"{'uncached':>10}{'diverges in':>13}")
    for b, r in results.items():
        for pol, x in r["policies"].items():
            if "error" in x:
                print(f"{b:<{wb}}{pol:<{w}}  refused: {x['error'][:60]}")
                continue
            for y in x["by_round"]:
                print(f"{b:<{wb}}{pol:<{w}}{y['round']:>6}{C.fmt(y['recompute_fraction'], 3):>11}{y['top1']:>8.3f}"
                      f"{max(0.0, y['kl']):>9.4f}{y['greedy']:>8.2f}{y['uncached_tokens']:>10}"
                      f"{_diverged(x) if y is x['by_round'][-1] else '':>13}")
        print(f"{b}: copy slots made over a run {C.fmt(r.get('copy_slots_made'))}")
    for label, cmp_ in (("tokendance", comparison), *comparison_max_gap.items()):
        for pol, c in cmp_.items():
            budget = "" if c["equal_budget"] else (" -- NOT at the same budget: pic recomputed "
                                                   f"{C.fmt(c['pic']['recompute_fraction'], 3)} of the block")
            print(f"{pol}: {label} {'at least as good as' if c['tokendance_at_least_as_good'] else 'worse than'} "
                  f"pic in the last round (top-1 {c['delta_top1']:+.3f}, KL {c['delta_kl']:+.4f}); rounds at least "
                  f"as good: {c['rounds_at_least_as_good']} of {c['rounds_compared']}{budget}")
    if skipped:
        print(f"skipped: {skipped}")
    C.finish(log, NAME, paths)
    return 0


def _as_good(t: dict, p: dict) -> bool:
    return t["top1"] >= p["top1"] and t["kl"] <= p["kl"]


def equal_budget(a: float | None, b: float | None) -> bool:
    """Whether two recomputed fractions of the block count as the same budget (``tables.py`` reads it too)."""
    return a is None and b is None or (a is not None and b is not None and abs(a - b) <= EQUAL_BUDGET)


def against_pic(results: dict, label: str, policies: list[str]) -> dict:
    """Per policy: the tokendance run ``label`` against pic at the same policy, in the last round (deltas > 0 top-1 /
    < 0 KL: better) and round by round."""
    out = {}
    if label not in results or "pic" not in results:
        return out
    keys = ("top1", "kl", "greedy", "recompute_fraction", "first_divergent_round")
    for pol in policies:
        t, p = results[label]["policies"].get(pol, {}), results["pic"]["policies"].get(pol, {})
        if "top1" in t and "top1" in p:
            rounds = [_as_good(a, b) for a, b in zip(t["by_round"], p["by_round"])]
            out[pol] = {
                "tokendance": {k: t[k] for k in keys}, "pic": {k: p[k] for k in keys},
                "tokendance_at_least_as_good": _as_good(t, p),
                "equal_budget": equal_budget(t["recompute_fraction"], p["recompute_fraction"]),
                "delta_top1": t["top1"] - p["top1"],
                "delta_kl": t["kl"] - p["kl"],
                "rounds_compared": len(rounds), "rounds_at_least_as_good": sum(rounds),
                "delta_kl_by_round": [a["kl"] - b["kl"] for a, b in zip(t["by_round"], p["by_round"])],
            }
    return out


def plot(data: dict, args) -> Path:
    """Left: the quality-cost curve of the last round (KL against the fraction recomputed, one line per backend).
    Middle and right: top-1 and KL round by round (colour: policy, solid: tokendance, dashed: pic), so drift shows."""
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {}
    for b, r in data["results"].items():
        pts = [(pol, x) for pol, x in r["policies"].items() if "top1" in x and x.get("recompute_fraction") is not None]
        pts.sort(key=lambda t: t[1]["recompute_fraction"])
        axes[0].plot([x["recompute_fraction"] for _, x in pts], [x["kl"] for _, x in pts], marker="o", label=b)
        for pol, x in pts:
            axes[0].annotate(pol, (x["recompute_fraction"], x["kl"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
        if b not in ("pic", "tokendance"):
            continue
        for pol, x in pts:
            if pol == "full":  # exact by construction; its flat line hides the others
                continue
            c = colours.setdefault(pol, f"C{len(colours)}")
            rs = [y["round"] for y in x["by_round"]]
            for ax, key in ((axes[1], "top1"), (axes[2], "kl")):
                ax.plot(rs, [y[key] for y in x["by_round"]], marker="o", color=c,
                        linestyle="-" if b == "tokendance" else "--", label=f"{b} {pol}")
    axes[0].set_xlabel("fraction of shared-block tokens recomputed (last round)")
    axes[0].set_ylabel("mean KL(exact || reuse), top-k")
    axes[0].set_title("quality against cost, last round")
    for ax, title in ((axes[1], "teacher-forced top-1 agreement"), (axes[2], "mean KL(exact || reuse), top-k")):
        ax.set_xlabel("round")
        ax.set_title(f"{title} by round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    return C.save_figure(fig, C.out_name(NAME, args), args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
