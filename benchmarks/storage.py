"""KV held per agent, round by round, on the history workload: radix, pic and tokendance (at page sizes 1 and 16).

    python benchmarks/storage.py [--quick] [--backends radix pic tokendance] [--agents 4 8 16] [--rounds 3]
                                 [--max-new-tokens 48] [--page-sizes 1 16] [--workload history|last-round]

Every agent keeps its whole chat history and each round appends everyone's last answers (``--workload history``,
the paper's shape; ``last-round``: only the last round's block, the earlier workload). Every output has
``--max-new-tokens`` tokens (EOS ignored), so every backend builds the same prompts. One server per backend and page
size (``--page-sizes`` applies to tokendance; radix and pic run at page size 1), a pool large enough that nothing is
evicted; for each N the cache is flushed and ``--rounds`` rounds run. Measured per round, per agent (bytes = slots x
the K+V bytes of one token over all layers):

* **row** -- the KV a round's row holds for its prompt and output: tokendance/pic from ``kv_per_agent_by_round`` of
  ``/tokendance/stats`` (master slots divided among the rows sharing them, diff pages whole); a radix row holds every
  token of its prompt and output itself;
* **shared history** -- the same for the row's gathered spans alone (everyone's answers so far): the region the
  paper's diff-aware storage compresses; a radix or pic row holds each of those tokens;
* **held at the peak** -- the largest ``used_slots - evictable_size`` polled during the round, / N;
* **copied pages** (tokendance at page size > 1) -- row pages copied on write in the round, and their tokens;
* **dense / held** -- a dense per-agent copy of the row (every prompt and output token) over the row measure, and of
  the shared history over the shared-history measure: the paper's compression, read from one backend's own run (so
  ``--backends tokendance`` alone gives it at an N whose radix run would not fit in memory).

Compression = baseline / tokendance of each measure, in the same run; page price = tokendance at page P / page 1.
Writes benchmarks/results/storage[_TAG][_quick].json and .png.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "storage"
MEASURES = ("row_kv_per_agent_bytes", "shared_kv_per_agent_bytes", "held_kv_per_agent_bytes")
LABELS = {"row_kv_per_agent_bytes": "row", "shared_kv_per_agent_bytes": "shared history of the row",
          "held_kv_per_agent_bytes": "held at the peak / N"}


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument("--agents", type=int, nargs="+", default=None, help="N values (default 4 8 16; --quick: 4 8). N = 32 needs "
                        "a pool of about 240k tokens for radix at 64-token outputs (11 GB of KV here)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 4; --quick: 3)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="output length (default 96; --quick: 48)")
    p.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16], help="tokendance page sizes (default 1 16)")
    p.add_argument("--pool", type=int, default=None, help="--max-total-tokens of every server (default 131072; "
                                                           "--quick: 65536); must hold a run without eviction")
    a = p.parse_args(argv)
    a.agents = a.agents or ([4, 8] if a.quick else [4, 8, 16])
    a.rounds = a.rounds or (3 if a.quick else 4)
    a.max_new_tokens = a.max_new_tokens or (48 if a.quick else 96)
    a.pool = a.pool or (65536 if a.quick else 131072)
    if a.rounds < 2:
        p.error("--rounds must be >= 2")
    return a


def configs(args) -> list[tuple[str, str, int]]:
    """(result key, backend, page size): tokendance once per page size, the baselines at page size 1."""
    out = []
    for b in args.backends:
        for ps in (args.page_sizes if b == "tokendance" else [1]):
            out.append((b if ps == 1 else f"{b}@{ps}", b, ps))
    return out


def by_round(s: dict, r: int, field: str) -> float | None:
    """Mean ``field`` per row of round ``r`` in ``kv_per_agent_by_round`` (it restarts with every flush, and every
    run starts with one)."""
    a = (s.get("kv_per_agent_by_round") or {}).get(str(r))
    return a[field] if a and a.get("rows") and field in a else None


def measure(args, srv, n: int, bpt: int, log) -> list[dict]:
    w = C.make_workload(args, n, args.rounds, args.max_new_tokens)
    before = srv.stats()
    run = C.run_rounds(srv, w, max_new_tokens=args.max_new_tokens, poll=0.2,
                       payload_hook=lambda q, p: p["sampling_params"].update(ignore_eos=True))
    after = run["rounds"][-1]["stats_after"]
    out, prev = [], before
    for r, (rd, rec) in enumerate(zip(run["rounds"], run["_result"].rounds)):
        s = rd["stats_after"]
        prompt = statistics.fmean(a.prompt_tokens for a in rec.agents)
        shared = statistics.fmean(a.shared_tokens for a in rec.agents)
        dense = statistics.fmean(a.prompt_tokens + a.generated_tokens for a in rec.agents)
        row = by_round(after, r, "tokens")
        held_shared = by_round(after, r, "shared_held_tokens")
        if row is None:  # radix: a row holds every token of its prompt and output
            row, held_shared = dense, shared
        out.append({
            "round": r, "prompt_tokens_per_agent": prompt, "shared_tokens_per_agent": shared,
            "shared_fraction_of_prompt": shared / prompt if prompt else 0.0,
            "row_kv_per_agent_bytes": row * bpt, "shared_kv_per_agent_bytes": held_shared * bpt,
            "held_kv_per_agent_bytes": rd.get("peak_held_slots", 0) / n * bpt,
            # the paper's compression, within this run: a dense per-agent copy of the tokens over what the row holds
            "dense_over_row": C.ratio(dense, row), "dense_over_shared": C.ratio(shared, held_shared),
            "pool_used_slots": s["used_slots"], "possible_eviction": s["available_size"] < 0.05 * s["max_total_num_tokens"],
            "cow_pages": s.get("cow_pages", 0) - prev.get("cow_pages", 0),
            "cow_tokens": s.get("cow_tokens", 0) - prev.get("cow_tokens", 0),
            "reused_tokens": s.get("reused_tokens", 0) - prev.get("reused_tokens", 0),
            "latency_s": rd["latency_s"],
        })
        prev = s
    last = out[-1]
    log(f"  {srv.backend} N={n}: last round: shared {last['shared_fraction_of_prompt']:.0%} of the prompt; per agent "
        f"row {last['row_kv_per_agent_bytes'] / 2**20:.2f} MiB, shared history "
        f"{last['shared_kv_per_agent_bytes'] / 2**20:.2f} MiB ({C.fmt(last['dense_over_shared'])}x less than dense "
        f"copies), held {last['held_kv_per_agent_bytes'] / 2**20:.2f} MiB, pages copied {last['cow_pages']}")
    return out


def ratios(results: dict, num_key: str, den_key: str, args) -> dict:
    """``num / den`` of each measure, per N and round (in the same run)."""
    out = {}
    num, den = results.get(num_key), results.get(den_key)
    if not num or not den:
        return out
    for n in map(str, args.agents):
        out[n] = [{m: C.ratio(a[m], b[m]) for m in MEASURES} for a, b in zip(num.get(n, []), den.get(n, []))]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    env = C.environment()
    args.backends, skipped = C.resolve_backends(args.backends, log)
    C.model_path(args)
    bpt = C.kv_bytes_per_token(args.model)
    log(f"{args.workload} workload: configurations {[k for k, _, _ in configs(args)]}, N {args.agents}, "
        f"{args.rounds} rounds of {args.max_new_tokens}-token outputs, pool {args.pool} tokens, {bpt['bytes']} KV bytes "
        f"per token")
    results: dict[str, dict] = {}
    servers = {}
    for key, backend, ps in configs(args):
        try:
            extra = ["--max-total-tokens", str(args.pool), "--page-size", str(ps)]
            with C.server(args, backend, log, extra=extra) as srv:
                servers[key] = srv.info
                results[key] = {str(n): measure(args, srv, n, bpt["bytes"], log)
                                for n in C.progress(args.agents, desc=f"storage {key}")}
        except Exception as e:  # noqa: BLE001  (a configuration that fails is reported, the others still run)
            C.backend_failed(key, e, skipped, log)
            results.pop(key, None)

    compression = {f"{b}_over_tokendance": ratios(results, b, "tokendance", args) for b in ("radix", "pic")}
    page_price = {str(ps): ratios(results, f"tokendance@{ps}", "tokendance", args) for ps in args.page_sizes if ps != 1}
    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "settings": {
            "configs": [k for k in results], "skipped": skipped, "workload": args.workload, "agents": args.agents,
            "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "ignore_eos": True,
            "page_sizes": args.page_sizes, "pool_tokens": args.pool, "kv_bytes_per_token": bpt, "style": args.style,
            "seed": args.seed, "workload_sizes": C.workload_sizes(args) or "workload defaults", "model": args.model,
            "server_args": args.server_arg,
            "measures": {
                "row_kv_per_agent_bytes": "slots a round's row held for its prompt and output, masters divided among "
                                          "their sharers (tokendance/pic: kv_per_agent_by_round; radix: prompt + "
                                          "generated tokens) x bytes per token",
                "shared_kv_per_agent_bytes": "the same for the row's gathered spans (tokendance/pic: "
                                             "shared_held_tokens; radix: the gathered tokens of the prompt)",
                "held_kv_per_agent_bytes": "peak over polls during the round of (used_slots - evictable_size) / N",
                "cow_pages": "row pages copied on write in the round (page_size > 1)",
                "dense_over_row": "prompt + generated tokens per agent / the row measure's tokens (1 for radix)",
                "dense_over_shared": "gathered tokens of the prompt per agent / shared_held_tokens (1 for radix)",
            },
        },
        "servers": servers,
        "results": results,
        "compression": compression,
        "page_price": page_price,  # page size -> tokendance at that page size / at page size 1
        "environment": {**env, "loadavg_at_end": list(os.getloadavg())},
    }
    paths = [C.write_json(C.out_name(NAME, args), args.quick, data, args.out_dir)]
    if not args.no_plot:
        paths.append(plot(data, args))
    summary(data, args)
    C.finish(log, NAME, paths)
    return 0


def summary(data: dict, args) -> None:
    last = args.rounds - 1
    print(f"\n=== KV per agent in round {last} (MiB: " + " / ".join(LABELS[m] for m in MEASURES) +
          f"), {args.workload} workload, {'quick' if args.quick else 'full'} size")
    print(f"{'N':>4}" + "".join(f"{k:>26}" for k in data["results"]) + f"{'radix / tokendance':>26}")
    for n in map(str, args.agents):
        line = f"{n:>4}"
        for res in data["results"].values():
            r = res[n][last]
            line += f"{' / '.join(f'{r[m] / 2**20:.2f}' for m in MEASURES):>26}"
        c = (data["compression"].get("radix_over_tokendance") or {}).get(n)
        line += f"{' / '.join(C.fmt(c[last][m]) for m in MEASURES) if c else '-':>26}"
        print(line)
    for key, res in data["results"].items():
        if key != "radix":
            print(f"{key}: dense per-agent copies / held, round {last} (row / shared history): " + ", ".join(
                f"N={n} {C.fmt(res[n][last].get('dense_over_row'))} / {C.fmt(res[n][last].get('dense_over_shared'))}"
                for n in map(str, args.agents) if n in res))
    for ps, per_n in data["page_price"].items():
        for n, rs in per_n.items():
            copied = [r["cow_pages"] for r in data["results"][f"tokendance@{ps}"][n]]
            print(f"tokendance page {ps} / page 1, N={n}, round {last}: "
                  + ", ".join(f"{LABELS[m]} {C.fmt(rs[last][m])}x" for m in MEASURES) + f"; pages copied by round {copied}")
    if data["settings"]["skipped"]:
        print(f"skipped: {data['settings']['skipped']}")


def plot(data: dict, args) -> Path:
    """One panel per measure: MiB per agent against the round, one line per configuration at the largest N; the last
    panel: radix / tokendance at the last round against N."""
    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(MEASURES) + 1, figsize=(5 * (len(MEASURES) + 1), 4.2))
    n = str(max(args.agents))
    rounds = list(range(args.rounds))
    for ax, m in zip(axes, MEASURES):
        for key, res in data["results"].items():
            ax.plot(rounds, [r[m] / 2**20 for r in res[n]], marker="o", label=key)
        ax.set_title(f"{LABELS[m]}, N = {n}")
        ax.set_xlabel("round")
        ax.set_ylabel("MiB per agent")
        ax.legend(fontsize=7)
    ax = axes[-1]
    comp = data["compression"].get("radix_over_tokendance") or {}
    for m in MEASURES:
        ys = [comp[str(k)][-1][m] if str(k) in comp else None for k in args.agents]
        ax.plot(args.agents, [y if y is not None else float("nan") for y in ys], marker="o", label=LABELS[m])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title(f"radix / tokendance, round {args.rounds - 1}")
    ax.set_xlabel("agents N")
    ax.set_ylabel("x less KV than radix")
    ax.legend(fontsize=7)
    return C.save_figure(fig, C.out_name(NAME, args), args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
