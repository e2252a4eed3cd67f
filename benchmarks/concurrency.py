"""Agents under a round-latency SLO at a fixed KV pool: the largest N per backend, and the ratios.

    python benchmarks/concurrency.py [--quick] [--backends radix pic tokendance] [--pool 2560]
                                     [--slo-multiple 6] [--agents 1 2 4 6 8 10 12]

Every backend's server runs with the same small KV pool (``--max-total-tokens``), sized so that radix, which keeps
one copy of the shared block per agent, runs short of KV at a modest N.  The SLO is a bound on the round latency
(release of a round's N requests -> last response): ``slo_multiple`` times the single-agent round latency measured
first, in the same run, on the reference backend (radix unless it is not run).  For each backend and each N
(ascending; a backend stops after ``--patience`` consecutive N miss the SLO) the cache is flushed and the seeded
GenerativeAgents-like workload runs R rounds; round 0 is a warm-up in which every backend does the same work (no
earlier outputs exist, the private prefixes are cold), so the SLO applies to every round >= 1.  The answer per
backend is the largest N such that it and every smaller N swept met the SLO in all their rounds >= 1 ("censored"
when the sweep never failed: the true value is at least that).

Recorded per run: round latencies, the server's CPU seconds per round, peak used KV slots (polled), the scheduler's
prefill batches and longest waiting queue.  On CPU every number is a ratio within this run, not a speed claim.
Writes benchmarks/results/concurrency[_quick].json and .png.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "concurrency"


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument("--agents", type=int, nargs="+", default=None,
                   help="N values, ascending (default 2 4 6 8 10 12 14 16 20 24 28 32; --quick: 2 4 6 8 10 12)")
    p.add_argument("--pool", type=int, default=None,
                   help="--max-total-tokens of every server (default 32768; --quick: 2560)")
    p.add_argument("--slo-multiple", type=float, default=None,
                   help="SLO = this x the single-agent round latency (default 6; --quick: 6)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 4; --quick: 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per request (default 96; --quick: 16)")
    p.add_argument("--single-repeats", type=int, default=2, help="single-agent runs; the median sets the SLO")
    p.add_argument("--patience", type=int, default=1, help="stop a backend after this many consecutive failing N")
    p.add_argument("--reference", default="radix", help="backend whose single-agent latency sets the SLO "
                                                        "(default radix; the first backend run if absent)")
    a = p.parse_args(argv)
    full = [2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32]
    a.agents = sorted(set(a.agents or ([2, 4, 6, 8, 10, 12] if a.quick else full)))
    a.pool = a.pool or (2560 if a.quick else 32768)
    a.slo_multiple = a.slo_multiple or 6.0
    a.rounds = a.rounds or (2 if a.quick else 4)
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 96)
    if a.rounds < 2:
        p.error("--rounds must be >= 2 (round 0 is the warm-up)")
    return a


def run_once(args, srv, n: int) -> dict:
    w = C.make_workload(args, n, args.rounds, args.max_new_tokens)
    run = C.run_rounds(srv, w, max_new_tokens=args.max_new_tokens, poll=1.0)
    rounds = run["rounds"]
    return {
        "n_agents": n,
        "round_latency_s": [r["latency_s"] for r in rounds],
        "server_cpu_s": [r["server_cpu_s"] for r in rounds],
        "prompt_tokens": [r["prompt_tokens"] for r in rounds],
        "uncached_tokens": [r["uncached_tokens"] for r in rounds],
        "generated_tokens": [r["generated_tokens"] for r in rounds],
        "prefill_batches": [r["scheduler"]["prefill_batches"] for r in rounds],
        "max_queue_req": [r["scheduler"]["max_queue_req"] for r in rounds],
        "peak_used_slots": run["peak_used_slots"],
        "peak_held_slots": run["peak_held_slots"],
        "peak_held_slots_per_round": [r.get("peak_held_slots") for r in rounds],
        "loadavg_1min_after": os.getloadavg()[0],  # other processes on a shared host inflate wall latency
        "measured_round_latency_max_s": max(r["latency_s"] for r in rounds[1:]),
        "measured_round_cpu_max_s": max(r["server_cpu_s"] for r in rounds[1:]),
    }


def largest_passing(sweep: list[dict], key: str, bound: float) -> tuple[int, bool]:
    """(largest N with every N up to it passing, censored = the sweep never failed)."""
    best = 0
    for rec in sweep:
        if rec[key] <= bound:
            best = rec["n_agents"]
        else:
            return best, False
    return best, True


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    env = C.environment()
    backends, skipped = C.resolve_backends(args.backends, log)
    C.model_path(args)
    ref = args.reference if args.reference in backends else (backends[0] if backends else None)
    order = [ref] + [b for b in backends if b != ref] if ref else []
    log(f"backends {order} (SLO reference: {ref}), pool {args.pool} tokens, SLO = {args.slo_multiple} x single-agent "
        f"round latency, N {args.agents}, {args.rounds} rounds of {args.max_new_tokens} new tokens, workload sizes "
        f"{C.workload_sizes(args) or 'default'}")
    slo = slo_cpu = None
    results: dict[str, dict] = {}
    servers = {}
    for backend in order:
        try:
            with C.server(args, backend, log, extra=["--max-total-tokens", str(args.pool)]) as srv:
                servers[backend] = srv.info
                singles = [run_once(args, srv, 1) for _ in range(args.single_repeats)]
                single_lat = statistics.median(s["measured_round_latency_max_s"] for s in singles)
                single_cpu = statistics.median(s["measured_round_cpu_max_s"] for s in singles)
                if slo is None:  # the reference (radix), or the first backend that ran if it failed
                    ref = backend
                    slo, slo_cpu = args.slo_multiple * single_lat, args.slo_multiple * single_cpu
                    log(f"single agent on {backend}: round latency {single_lat:.2f}s -> SLO {slo:.2f}s "
                        f"(server CPU {single_cpu:.2f}s -> CPU bound {slo_cpu:.2f}s)")
                else:
                    log(f"single agent on {backend}: round latency {single_lat:.2f}s (SLO stays {slo:.2f}s)")
                sweep, fails = [], 0
                for n in C.progress(args.agents, desc=f"concurrency {backend}"):
                    rec = run_once(args, srv, n)
                    rec["meets_slo"] = rec["measured_round_latency_max_s"] <= slo
                    sweep.append(rec)
                    log(f"  {backend} N={n}: rounds {[round(x, 2) for x in rec['round_latency_s']]} s (SLO {slo:.2f}s: "
                        f"{'met' if rec['meets_slo'] else 'MISSED'}), peak used {rec['peak_used_slots']}/{args.pool} "
                        f"slots, longest queue {max(rec['max_queue_req'])}")
                    fails = 0 if rec["meets_slo"] else fails + 1
                    if fails >= args.patience:
                        break
                max_n, censored = largest_passing(sweep, "measured_round_latency_max_s", slo)
                max_n_cpu, censored_cpu = largest_passing(sweep, "measured_round_cpu_max_s", slo_cpu)
                results[backend] = {
                    "single_agent": singles, "single_agent_round_latency_s": single_lat,
                    "single_agent_round_cpu_s": single_cpu, "sweep": sweep,
                    "max_agents_under_slo": max_n, "censored": censored,
                    "max_agents_under_cpu_bound": max_n_cpu, "censored_cpu": censored_cpu,
                }
                log(f"{backend}: largest N under the SLO = {max_n}{' (never failed: at least)' if censored else ''}")
        except Exception as e:  # noqa: BLE001  (a backend that fails is reported, the others still run)
            C.backend_failed(backend, e, skipped, log)
            results.pop(backend, None)

    ratios = {}
    td = results.get("tokendance")
    for base in ("radix", "pic"):
        b = results.get(base)
        if td and b:
            ratios[f"tokendance_over_{base}"] = C.ratio(td["max_agents_under_slo"], b["max_agents_under_slo"])
            ratios[f"tokendance_over_{base}_cpu_bound"] = C.ratio(td["max_agents_under_cpu_bound"],
                                                                  b["max_agents_under_cpu_bound"])

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "settings": {
            "backends": order, "skipped_backends": skipped, "pool_tokens": args.pool, "slo_multiple": args.slo_multiple,
            "slo_reference_backend": ref, "slo_s": slo, "cpu_bound_s": slo_cpu, "agents": args.agents,
            "rounds": args.rounds, "slo_rounds": "every round >= 1 (round 0 is the same cold warm-up everywhere)",
            "max_new_tokens": args.max_new_tokens, "patience": args.patience, "single_repeats": args.single_repeats,
            "workload": args.workload, "style": args.style, "seed": args.seed,
            "workload_sizes": C.workload_sizes(args) or "workload defaults",
            "model": args.model, "server_args": args.server_arg,
            "cpu_bound_note": "secondary: the same sweep judged on the server's CPU seconds per round against "
                              "slo_multiple x the single-agent CPU seconds (less sensitive to other load); the sweep "
                              "itself stops on the wall-clock SLO, so this can only be read up to that point",
        },
        "servers": servers,
        "results": results,
        "ratios": ratios,
        "environment": {**env, "loadavg_at_end": list(os.getloadavg())},
    }
    paths = [C.write_json(C.out_name(NAME, args), args.quick, data, args.out_dir)]
    if not args.no_plot and results:
        paths.append(plot(data, args))

    print(f"\n=== agents under the SLO ({args.slo_multiple} x single-agent round latency = "
          f"{C.fmt(slo)} s on {ref}), pool {args.pool} tokens, {'quick' if args.quick else 'full'} size")
    print(f"{'backend':<12}{'single s':>10}{'max N':>8}{'  N: worst round latency s (met?)'}")
    for b, r in results.items():
        cells = ", ".join(f"{s['n_agents']}: {s['measured_round_latency_max_s']:.1f}{'' if s['meets_slo'] else '!'}"
                          for s in r["sweep"])
        print(f"{b:<12}{r['single_agent_round_latency_s']:>10.2f}{str(r['max_agents_under_slo']) + ('+' if r['censored'] else ''):>8}  {cells}")
    for k, v in ratios.items():
        print(f"{k}: {C.fmt(v)}")
    if skipped:
        print(f"skipped: {skipped}")
    C.finish(log, NAME, paths)
    return 0


def plot(data: dict, args) -> Path:
    plt = C.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b, r in data["results"].items():
        ns = [s["n_agents"] for s in r["sweep"]]
        ax1.plot(ns, [s["measured_round_latency_max_s"] for s in r["sweep"]], marker="o",
                 label=f"{b} (max N {r['max_agents_under_slo']}{'+' if r['censored'] else ''})")
        ax2.plot(ns, [s["peak_used_slots"] for s in r["sweep"]], marker="o", label=b)
    slo = data["settings"]["slo_s"]
    if slo:
        ax1.axhline(slo, color="red", ls="--", lw=1, label=f"SLO {slo:.1f}s ({args.slo_multiple}x single agent)")
    ax1.set_xlabel("agents N")
    ax1.set_ylabel("worst round latency, rounds >= 1 (s)")
    ax1.set_title("round latency against N")
    ax1.legend(fontsize=8)
    ax2.axhline(args.pool, color="grey", ls="--", lw=1, label=f"pool {args.pool}")
    ax2.set_xlabel("agents N")
    ax2.set_ylabel("peak used KV slots (polled)")
    ax2.set_title("KV pool use")
    ax2.legend(fontsize=8)
    return C.save_figure(fig, C.out_name(NAME, args), args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
