"""Fidelity of approximate KV reuse against exact prefill, per recompute policy: the quality-cost curve.

    python benchmarks/fidelity.py [--quick] [--backends pic tokendance] [--policies none sink:4 sink:16 full]
                                  [--agents 4] [--rounds 2]

Reference: exact prefill on ``--kv-backend radix --disable-radix-cache`` (no prefix cache, true positions).  The
seeded GenerativeAgents-like workload runs there first (N agents, R rounds, greedy); the last round returns the
prompt logprobs of every request's task text (teacher forcing, top-k per position) and its first ``--probe-tokens``
generated tokens.  On every reuse backend (one server each), rounds 0 .. R-2 are replayed with the reference's
exact prompts (their outputs, registered as segments, are checked against the reference's), then the last round
is sent once per policy (``custom_params["td_recompute"]``, no ``td_out_seg``), with the same logprob options.

Quality (``tokendance_sgl.fidelity``): teacher-forced top-1 agreement and mean truncated KL(exact || reuse) over
the task positions (primary), greedy agreement of the first generated tokens and the first divergence
(secondary).  Cost: the fraction of the shared-block tokens recomputed (``/tokendance/stats`` counters
``recomputed_tokens`` / (``reused_tokens`` + ``recomputed_tokens``) over the probe) and the round's uncached tokens
(meta_info prompt_tokens - cached_tokens).  A policy a backend refuses (HTTP 400) is recorded as such.

tokendance aligns every agent's shared block at a canonical base (a hole of up to ``--td-max-gap`` positions, 64 by
default, before it); pic keeps true positions.  ``--max-gaps`` adds tokendance servers with smaller gaps (0: true
positions, one master copy per distinct start), so the position gap's share of the fidelity difference, and the
master copies it saves (``copy_slots_made``: K/V slots re-rotated into copies for the probed round), are measured
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
              "probe_tokens", "probe_token_layers", "selections", "selections_shared")
QUICK_MAX_GAPS = [0]
FULL_MAX_GAPS = [0, 16]


def parse_args(argv=None):
    p = C.base_parser(__doc__, default_backends=REUSE_BACKENDS)
    p.add_argument("--policies", nargs="+", default=None,
                   help=f"recompute policies, sent per request (default {' '.join(FULL_POLICIES)}; --quick: "
                        f"{' '.join(QUICK_POLICIES)})")
    p.add_argument("--agents", type=int, default=None, help="N (default 8; --quick: 4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the last one is probed (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens of the replayed rounds = segment length (default 32; --quick: 16)")
    p.add_argument("--probe-tokens", type=int, default=32, help="greedy tokens compared in the probed round")
    p.add_argument("--top-k", type=int, default=20, help="top logprobs per teacher-forced position")
    p.add_argument("--max-gaps", type=int, nargs="*", default=None,
                   help="extra tokendance servers with --td-max-gap G (the default server uses 64): the position gap "
                        "of the aligned layout traded for master copies (default 0 16; --quick: 0)")
    a = p.parse_args(argv)
    a.max_gaps = a.max_gaps if a.max_gaps is not None else (QUICK_MAX_GAPS if a.quick else FULL_MAX_GAPS)
    a.policies = a.policies or (QUICK_POLICIES if a.quick else FULL_POLICIES)
    a.agents = a.agents or (4 if a.quick else 8)
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 32)
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


def reference_run(args, log) -> dict:
    """The exact run: prompts, outputs and (last round) logprob responses of every request."""
    w = C.make_workload(args, args.agents, args.rounds, args.max_new_tokens)
    last = args.rounds - 1
    task_start: dict[tuple[int, int], int] = {}

    sent: dict[tuple[int, int], dict] = {}

    def hook(q, p):
        task_start[(q.round, q.agent)] = len(q.input_ids) - q.task_tokens
        if q.round == last:
            p["sampling_params"]["max_new_tokens"] = args.probe_tokens
            p.update(return_logprob=True, logprob_start_len=len(q.input_ids) - q.task_tokens,
                     top_logprobs_num=args.top_k)
        sent[(q.round, q.agent)] = copy.deepcopy(p)  # replayed verbatim on the reuse backends

    with C.server(args, "radix", log, extra=["--disable-radix-cache"]) as srv:
        run = C.run_rounds(srv, w, max_new_tokens=args.max_new_tokens, payload_hook=hook, log=log)
        server_info = srv.info
    res = run["_result"]
    rounds = []
    for rec in res.rounds:
        rounds.append([{
            "agent": a.agent, "input_ids": a.input_ids, "custom_params": a.custom_params, "output_ids": a.output_ids,
            "meta_info": a.meta_info, "task_start": task_start[(rec.round, a.agent)], "shared_tokens": a.shared_tokens,
            "payload": sent[(rec.round, a.agent)],
        } for a in rec.agents])
    return {"rounds": rounds, "latency_s": [r["latency_s"] for r in run["rounds"]], "server": server_info}


def payload(rec: dict, *, policy: str | None = None) -> dict:
    """The request the reference server got; with a policy (the probe): that policy, and no output registration."""
    p = copy.deepcopy(rec["payload"])
    if policy is not None:
        cp = p["sampling_params"].setdefault("custom_params", {})
        cp.pop("td_out_seg", None)
        cp["td_recompute"] = policy
    return p


def first_divergence(ref: list[int], got: list[int], n: int) -> int | None:
    for i, (a, b) in enumerate(zip(ref[:n], got[:n])):
        if a != b:
            return i
    return None if len(got) >= min(n, len(ref)) else min(len(ref), len(got))


def probe_backend(args, backend: str, ref: dict, log, extra: list[str] | None = None) -> dict:
    from tokendance_sgl.fidelity import compare_responses
    from tokendance_sgl.runner import ServerError

    out: dict = {"policies": {}}
    with C.server(args, backend, log, extra=extra) as srv:
        out["server"] = srv.info
        srv.flush()
        match = []
        for r in range(args.rounds - 1):
            bodies, _ = post_round(srv.url, [payload(a) for a in ref["rounds"][r]])
            match += [b["output_ids"] == a["output_ids"] for a, b in zip(ref["rounds"][r], bodies)]
        out["replay_outputs_match_reference"] = sum(match) / len(match)
        if not all(match):
            log(f"  {backend}: {len(match) - sum(match)} of {len(match)} replayed outputs differ from the reference's "
                "(those segments are recomputed by the backend; noted in the JSON)")
        probe = ref["rounds"][-1]
        ref_bodies = [{"output_ids": a["output_ids"], "meta_info": a["meta_info"]} for a in probe]
        shared = sum(a["shared_tokens"] for a in probe)
        for pol in C.progress(args.policies, desc=f"fidelity {backend}"):
            before = srv.stats()
            try:
                bodies, dt = post_round(srv.url, [payload(a, policy=pol) for a in probe])
            except ServerError as e:
                out["policies"][pol] = {"error": str(e)[:500]}
                log(f"  {backend} {pol}: refused ({str(e)[:160]})")
                continue
            after = srv.stats()
            f = compare_responses(ref_bodies, bodies, n=args.probe_tokens).as_dict()
            d = {k: after.get(k, 0) - before.get(k, 0) for k in STATS_KEYS if k in after}
            seg = d.get("reused_tokens", 0) + d.get("recomputed_tokens", 0)
            divs = [first_divergence(a["output_ids"], b["output_ids"], args.probe_tokens) for a, b in zip(probe, bodies)]
            rec = {
                **f,
                "first_divergence": divs,
                "recompute_fraction": (d["recomputed_tokens"] / seg) if seg else None,
                "stats_delta": d,
                "shared_tokens": shared,
                "prompt_tokens": sum(b["meta_info"]["prompt_tokens"] for b in bodies),
                "uncached_tokens": sum(b["meta_info"]["prompt_tokens"] - b["meta_info"].get("cached_tokens", 0)
                                       for b in bodies),
                "round_latency_s": dt,
            }
            pbr = C.prefill_by_round(after, args.rounds - 1)
            if pbr:
                pb = C.prefill_by_round(before, args.rounds - 1) or {}
                rec["prefill_by_round_delta"] = {k: v - pb.get(k, 0) for k, v in pbr.items() if isinstance(v, (int, float))}
            out["policies"][pol] = rec
            log(f"  {backend} {pol}: top-1 {rec['top1']:.3f}, KL {rec['kl']:.4f}, greedy {rec['greedy']:.2f}, "
                f"recomputed {C.fmt(rec['recompute_fraction'], 3)} of the segment tokens, uncached "
                f"{rec['uncached_tokens']} tok")
        # the memory side of the position gap: master copies re-rotated for the probed round (one per segment and
        # base; later policies of the same round reuse them)
        done = [x for x in out["policies"].values() if "stats_delta" in x]
        for key, name in (("master_copies", "master_copies_made"), ("rotated_tokens", "copy_slots_made")):
            out[name] = sum(x["stats_delta"].get(key, 0) for x in done) if done else None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    env = C.environment()
    backends, skipped = C.resolve_backends(args.backends, log)
    C.model_path(args)
    log(f"reference: exact prefill (radix --disable-radix-cache); backends {backends}; policies {args.policies}; "
        f"{args.agents} agents x {args.rounds} rounds (round {args.rounds - 1} probed), segments of "
        f"{args.max_new_tokens} tokens, workload sizes {C.workload_sizes(args) or 'default'}")
    ref = reference_run(args, log)
    results = {}
    runs = [(b, b, None) for b in backends]
    if "tokendance" in backends:
        runs += [(f"tokendance --td-max-gap {g}", "tokendance", ["--td-max-gap", str(g)]) for g in args.max_gaps]
    for label, b, extra in runs:
        try:
            results[label] = probe_backend(args, b, ref, log, extra)
        except Exception as e:  # noqa: BLE001  (a backend that fails is reported, the others still run)
            C.backend_failed(label, e, skipped, log)

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
            "server_args": args.server_arg, "max_gaps": args.max_gaps,
            "reference": "radix --disable-radix-cache (exact prefill at true positions)",
            "quality": "top1, kl: teacher-forced over each request's task tokens (KL over the reference's top-k); "
                       "greedy: fraction of the first probe_tokens generated before the first divergence",
            "cost": "recompute_fraction = recomputed / (reused + recomputed) segment tokens from /tokendance/stats; "
                    "uncached_tokens from meta_info",
        },
        "reference": {"round_latency_s": ref["latency_s"], "server": ref["server"],
                      "shared_tokens_probed_round": sum(a["shared_tokens"] for a in ref["rounds"][-1])},
        "results": results,
        "comparison": comparison,
        "comparison_max_gap": comparison_max_gap,
        "environment": {**env, "loadavg_at_end": list(os.getloadavg())},
    }
    paths = [C.write_json(NAME, args.quick, data, args.out_dir)]
    if not args.no_plot and results:
        paths.append(plot(data, args))

    print(f"\n=== fidelity against exact prefill, {args.agents} agents, round {args.rounds - 1}, "
          f"{'quick' if args.quick else 'full'} size")
    w = max([8] + [len(p) + 2 for p in args.policies])
    wb = max([12] + [len(b) + 2 for b in results])
    print(f"{'backend':<{wb}}{'policy':<{w}}{'recomputed':>11}{'top-1':>8}{'KL':>9}{'greedy':>8}{'uncached':>10}"
          f"{'copy slots':>12}")
    for b, r in results.items():
        for pol, x in r["policies"].items():
            if "error" in x:
                print(f"{b:<{wb}}{pol:<{w}}  refused: {x['error'][:60]}")
                continue
            print(f"{b:<{wb}}{pol:<{w}}{C.fmt(x['recompute_fraction'], 3):>11}{x['top1']:>8.3f}"
                  f"{max(0.0, x['kl']):>9.4f}{x['greedy']:>8.2f}{x['uncached_tokens']:>10}"
                  f"{C.fmt(r.get('copy_slots_made')):>12}")
    for label, cmp_ in (("tokendance", comparison), *comparison_max_gap.items()):
        for pol, c in cmp_.items():
            print(f"{pol}: {label} {'at least as good as' if c['tokendance_at_least_as_good'] else 'worse than'} "
                  f"pic (top-1 {c['delta_top1']:+.3f}, KL {c['delta_kl']:+.4f})")
    if skipped:
        print(f"skipped: {skipped}")
    C.finish(log, NAME, paths)
    return 0


def against_pic(results: dict, label: str, policies: list[str]) -> dict:
    """Per policy: the tokendance run ``label`` against pic at the same policy (deltas > 0 top-1 / < 0 KL: better)."""
    out = {}
    if label not in results or "pic" not in results:
        return out
    for pol in policies:
        t, p = results[label]["policies"].get(pol, {}), results["pic"]["policies"].get(pol, {})
        if "top1" in t and "top1" in p:
            out[pol] = {
                "tokendance": {k: t[k] for k in ("top1", "kl", "greedy", "recompute_fraction")},
                "pic": {k: p[k] for k in ("top1", "kl", "greedy", "recompute_fraction")},
                "tokendance_at_least_as_good": t["top1"] >= p["top1"] and t["kl"] <= p["kl"],
                "delta_top1": t["top1"] - p["top1"],
                "delta_kl": t["kl"] - p["kl"],
            }
    return out


def plot(data: dict, args) -> Path:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for b, r in data["results"].items():
        pts = [(pol, x) for pol, x in r["policies"].items() if "top1" in x and x.get("recompute_fraction") is not None]
        pts.sort(key=lambda t: t[1]["recompute_fraction"])
        xs = [x["recompute_fraction"] for _, x in pts]
        for ax, key in zip(axes, ("top1", "kl", "greedy")):
            ax.plot(xs, [x[key] for _, x in pts], marker="o", label=b)
            for pol, x in pts:
                ax.annotate(pol, (x["recompute_fraction"], x[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    for ax, title in zip(axes, ("teacher-forced top-1 agreement", "mean KL(exact || reuse), top-k",
                                f"greedy agreement, first {args.probe_tokens} tokens")):
        ax.set_xlabel("fraction of shared-block tokens recomputed")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=8)
    return C.save_figure(fig, NAME, args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
