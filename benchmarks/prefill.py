"""Prefill time per round against the number of agents, for radix, pic and tokendance, as ratios from one run.

    python benchmarks/prefill.py [--quick] [--backends radix pic tokendance] [--agents 4 8 16] [--rounds 2]
                                 [--max-new-tokens 128] [--repeats 3] [--pool 131072] [--policy deviation:0.15]

For every backend (one server each, started once) and every N: flush the cache, run rounds 0 .. R-2 of the seeded
GenerativeAgents-like workload normally (their real outputs are registered in the cache), then time round R-1 with
``max_new_tokens=1`` for every request: its round latency (release -> last response) is the time to prefill the
round's N prompts and sample one token.  Recorded per timed round: that latency, the CPU seconds of the server's
processes during it (less sensitive to other load on a shared host), the prefill work every backend reports
(uncached tokens = meta_info prompt_tokens - cached_tokens, summed over the round), and ``prefill_by_round`` from
``/tokendance/stats`` where the backend reports it.  The ratios pic / tokendance and radix / tokendance are taken per
N.  On CPU these are ratios, not absolute speeds.

The recompute policy defaults to ``deviation:0.15`` for both reuse backends: the paper's baseline is PIC with
CacheBlend's selection run once per request (about 15 % of a block recomputed, chosen by deviation at a check layer),
so pic probes every agent's copy while tokendance probes one pilot per segment and round.  ``--policy sink:4``
measures the case where selection costs nothing.

Writes benchmarks/results/prefill[_quick].json and .png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "prefill"


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument("--agents", type=int, nargs="+", default=None, help="N values (default 4 8 16; --quick: 4 10)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run; the last one is timed (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="new tokens of the untimed rounds (default 128; "
                                                                     "--quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="runs per (backend, N); the median is reported "
                                                              "(default 3; --quick: 2)")
    p.add_argument("--pool", type=int, default=None, help="--max-total-tokens of every server (default 131072, so "
                                                           "radix keeps every path at N = 16; --quick: SGLang's)")
    a = p.parse_args(argv)
    a.agents = a.agents or ([4, 10] if a.quick else [4, 8, 16])
    a.rounds = a.rounds or 2
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 128)
    a.repeats = a.repeats or (2 if a.quick else 3)
    a.pool = a.pool or (None if a.quick else 131072)
    a.policy = a.policy or "deviation:0.15"
    if a.rounds < 2:
        p.error("--rounds must be >= 2 (the timed round needs a previous round's outputs)")
    return a


def measure(args, srv, n: int, log) -> dict:
    w = C.make_workload(args, n, args.rounds, args.max_new_tokens)
    run = C.run_rounds(srv, w, max_new_tokens=args.max_new_tokens, last_round={"max_new_tokens": 1})
    last = run["rounds"][-1]
    prev_stats = run["rounds"][-2]["stats_after"]
    pbr_after = C.prefill_by_round(last["stats_after"], args.rounds - 1)
    pbr_before = C.prefill_by_round(prev_stats, args.rounds - 1) or {}
    pbr = None
    if pbr_after:  # counters may be cumulative over runs: take this run's increment
        pbr = {k: v - pbr_before.get(k, 0) if isinstance(v, (int, float)) else v for k, v in pbr_after.items()}
    rec = {
        "n_agents": n,
        "latency_s": last["latency_s"],
        "server_cpu_s": last["server_cpu_s"],
        "prompt_tokens": last["prompt_tokens"],
        "cached_tokens": last["cached_tokens"],
        "uncached_tokens": last["uncached_tokens"],
        "shared_tokens": last["shared_tokens"],
        "prefill_by_round": pbr,
        "scheduler": last["scheduler"],
        "untimed_round_latency_s": [r["latency_s"] for r in run["rounds"][:-1]],
        "loadavg_1min_after": __import__("os").getloadavg()[0],
    }
    log(f"  {srv.backend} N={n}: timed round {args.rounds - 1}: {rec['latency_s']:.2f}s wall, "
        f"{rec['server_cpu_s']:.1f} server CPU s, prompt {rec['prompt_tokens']} tok, uncached {rec['uncached_tokens']}"
        + (f", computed {pbr.get('computed_tokens')}" if pbr else ""))
    return rec


def aggregate(reps: list[dict]) -> dict:
    out = dict(reps[0])
    for k in ("latency_s", "server_cpu_s"):
        out[k] = C.median([r[k] for r in reps])
        out[k + "_all"] = [r[k] for r in reps]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    env = C.environment()
    backends, skipped = C.resolve_backends(args.backends, log)
    C.model_path(args)
    log(f"backends {backends}, N {args.agents}, {args.rounds} rounds (round {args.rounds - 1} timed with "
        f"max_new_tokens=1), {args.repeats} repeat(s), workload sizes {C.workload_sizes(args) or 'default'}")
    results: dict[str, dict] = {}
    servers: dict[str, dict] = {}
    pool = ["--max-total-tokens", str(args.pool)] if args.pool else None
    for backend in backends:
        try:
            with C.server(args, backend, log, extra=pool) as srv:
                servers[backend] = srv.info
                per_n = {}
                for n in C.progress(args.agents, desc=f"prefill {backend}"):
                    per_n[str(n)] = aggregate([measure(args, srv, n, log) for _ in range(args.repeats)])
                results[backend] = per_n
        except Exception as e:  # noqa: BLE001  (a backend that fails is reported, the others still run)
            C.backend_failed(backend, e, skipped, log)
            results.pop(backend, None)

    ratios = {}
    for n in map(str, args.agents):
        td = results.get("tokendance", {}).get(n)
        row = {}
        for base in ("pic", "radix"):
            b = results.get(base, {}).get(n)
            if td and b:
                row[f"{base}_over_tokendance"] = {
                    "latency": C.ratio(b["latency_s"], td["latency_s"]),
                    # the spread over repeats: the least and the most favourable pairing of the two backends' runs
                    "latency_min_max": [C.ratio(min(b["latency_s_all"]), max(td["latency_s_all"])),
                                        C.ratio(max(b["latency_s_all"]), min(td["latency_s_all"]))],
                    "server_cpu": C.ratio(b["server_cpu_s"], td["server_cpu_s"]),
                    "uncached_tokens": C.ratio(b["uncached_tokens"], td["uncached_tokens"]),
                }
                if b.get("prefill_by_round") and td.get("prefill_by_round"):
                    for k in ("computed_tokens", "token_layers"):  # token x layers: the probes' work counted too
                        row[f"{base}_over_tokendance"][k] = C.ratio(b["prefill_by_round"].get(k),
                                                                    td["prefill_by_round"].get(k))
        ratios[n] = row

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "settings": {
            "backends": backends, "skipped_backends": skipped, "agents": args.agents, "rounds": args.rounds,
            "timed_round": args.rounds - 1, "max_new_tokens_untimed": args.max_new_tokens, "repeats": args.repeats,
            "workload": args.workload, "style": args.style, "seed": args.seed,
            "workload_sizes": C.workload_sizes(args) or "workload defaults", "pool_tokens": args.pool,
            "model": args.model, "server_args": args.server_arg,
            "timing": "round latency of the last round with max_new_tokens=1 for every request (prefill + one "
                      "sampled token), earlier rounds run normally; median over repeats; server_cpu_s = CPU seconds "
                      "of the server's processes during that round",
            "prefill_work": "uncached_tokens = sum over the round of meta_info prompt_tokens - cached_tokens; "
                            "prefill_by_round from /tokendance/stats where reported",
        },
        "servers": servers,
        "results": results,
        "ratios": ratios,
        "environment": {**env, "loadavg_at_end": list(__import__("os").getloadavg())},
    }
    paths = [C.write_json(C.out_name(NAME, args), args.quick, data, args.out_dir)]
    if not args.no_plot:
        paths.append(plot(data, args))

    print(f"\n=== prefill time per round (round {args.rounds - 1}, max_new_tokens=1), {args.style}, "
          f"{'quick' if args.quick else 'full'} size")
    head = f"{'N':>4} " + "".join(f"{b + ' s':>14}{b + ' uncached':>18}" for b in results)
    head += "".join(f"{k:>22}" for k in ("pic/td latency", "radix/td latency", "pic/td uncached", "radix/td uncached"))
    print(head)
    for n in map(str, args.agents):
        line = f"{n:>4} "
        for b in results:
            r = results[b][n]
            line += f"{r['latency_s']:>14.2f}{r['uncached_tokens']:>18}"
        rr = ratios[n]
        for base, k in (("pic", "latency"), ("radix", "latency"), ("pic", "uncached_tokens"),
                        ("radix", "uncached_tokens")):
            line += f"{C.fmt(rr.get(f'{base}_over_tokendance', {}).get(k)):>22}"
        print(line)
    if skipped:
        print(f"skipped: {skipped}")
    C.finish(log, NAME, paths)
    return 0


COLORS = {"radix": "tab:blue", "pic": "tab:orange", "tokendance": "tab:green"}
TARGETS = {"radix": 3.0, "pic": 1.3}  # the paper's prefill targets at N = 16 (pic at deviation:0.15)


def plot(data: dict, args) -> Path:
    """Left: the timed round's latency per backend (median, min-max over repeats). Right: baseline / tokendance,
    latency (solid, with the min-max pairing as error bars) and computed prompt tokens (dashed), one colour per
    baseline, with the paper's latency target."""
    plt = C.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = args.agents
    for b, per_n in data["results"].items():
        med = [per_n[str(n)]["latency_s"] for n in ns]
        lo = [m - min(per_n[str(n)]["latency_s_all"]) for m, n in zip(med, ns)]
        hi = [max(per_n[str(n)]["latency_s_all"]) - m for m, n in zip(med, ns)]
        ax1.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, color=COLORS.get(b), label=b)
    ax1.set_xlabel("agents N")
    ax1.set_ylabel("round latency, s (wall; median, min-max over repeats)")
    ax1.set_title(f"prefill of round {args.rounds - 1} (max_new_tokens=1)")
    ax1.legend(fontsize=8)
    for base in ("radix", "pic"):
        rows = [data["ratios"][str(n)].get(f"{base}_over_tokendance") for n in ns]
        if not any(rows):
            continue
        lat = [r["latency"] if r else float("nan") for r in rows]
        spread = [(r.get("latency_min_max") or [r["latency"]] * 2) if r else [float("nan")] * 2 for r in rows]
        ax2.errorbar(ns, lat, yerr=[[m - s[0] for m, s in zip(lat, spread)], [s[1] - m for m, s in zip(lat, spread)]],
                     marker="o", capsize=3, color=COLORS[base], label=f"{base} / tokendance, latency")
        ax2.plot(ns, [r["uncached_tokens"] if r else float("nan") for r in rows], ls="--", marker="s",
                 color=COLORS[base], label=f"{base} / tokendance, computed prompt tokens")
        note = " (deviation:0.15)" if base == "pic" else ""
        ax2.axhline(TARGETS[base], color=COLORS[base], ls=":", lw=1,
                    label=f"target vs {base}: {TARGETS[base]:g}x{note}")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("agents N")
    ax2.set_ylabel("baseline / tokendance (x; > 1: tokendance better)")
    ax2.set_title("side-by-side ratios, same run")
    ax2.legend(fontsize=7)
    return C.save_figure(fig, C.out_name(NAME, args), args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
