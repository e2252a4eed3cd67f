"""KV bytes per agent against the number of agents N and the output length, for radix, pic and tokendance.

    python benchmarks/storage.py [--quick] [--backends radix pic tokendance] [--agents 4 8]
                                 [--output-lengths 32] [--pool 32768]

For every backend (one server each, a pool large enough that nothing is evicted) and every setting: flush, run
rounds 0 .. R-2 of the seeded GenerativeAgents-like workload with ``max_new_tokens = L`` (the output length, which
is also the length of every segment of the next round's shared block), then the measured last round, whose
requests generate ``--hold-tokens`` tokens (EOS ignored) so that all its rows are alive together for a few decode
steps.  Bytes = slots x the K+V bytes of one token over all layers.  Measures, all per agent (/ N):

* **held at the peak of the round** (the same for every backend): the largest ``used_slots - evictable_size``
  polled from ``/tokendance/stats`` during the measured round: the KV the round's requests hold (their own slots,
  the prefixes and masters they lock), without cache kept only for later hits.
* **pool used at the end of the round** (the same for every backend): ``used_slots`` at idle after the round.  It
  counts everything the cache keeps: private prefixes, the shared block (radix: one copy per agent in its tree;
  tokendance: the masters and their re-rotated copies) and earlier rounds' content; rows' private slots are freed
  by then (so pic's per-request copies no longer show here).
* **row KV per agent** (docs/architecture.md, "Metrics"): the slots a round's row held for its prompt and output, master
  slots divided among the rows that shared them.  tokendance/pic report it (``kv_per_agent_by_round``); a radix
  row holds every token of its prompt and output itself, so its value is ``prompt + generated`` tokens.
* **shared block of the row**: the same row KV for the row's segment spans alone (the last round's outputs it
  reads): radix and pic rows hold each of those tokens; a tokendance row holds its recomputed positions (diff slots)
  plus its share of the masters.  This is the region the paper's diff-aware storage compresses.
* also recorded: the round increment (growth of ``used_slots`` over the round, per agent) and the row KV beyond
  the agent's own cached prefix (``kv_bytes_by_agent_cumulative``; radix: its uncached tokens).

Compression = radix / tokendance and pic / tokendance of each measure.  Output lengths are swept at the middle N.
Writes benchmarks/results/storage[_quick].json and .png.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "storage"


def parse_args(argv=None):
    p = C.base_parser(__doc__)
    p.add_argument("--agents", type=int, nargs="+", default=None,
                   help="N values at the default output length (default 4 8 16 24; --quick: 4 8 16)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default output length L (default 32; --quick: 16)")
    p.add_argument("--output-lengths", type=int, nargs="+", default=None,
                   help="output lengths swept at --lengths-agents (default 16 32 64; --quick: 32 64)")
    p.add_argument("--lengths-agents", type=int, default=None, help="N of the output-length sweep (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per run; measured after the last (default 2)")
    p.add_argument("--hold-tokens", type=int, default=8,
                   help="new tokens (EOS ignored) of the measured round's requests, so that all rows are alive "
                        "together for a few decode steps while the pool is polled (default 8)")
    p.add_argument("--pool", type=int, default=None, help="--max-total-tokens of every server (default 65536; "
                                                           "--quick: 32768); must hold a run without eviction")
    a = p.parse_args(argv)
    a.agents = a.agents or ([4, 8, 16] if a.quick else [4, 8, 16, 24])
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 32)
    a.output_lengths = a.output_lengths or ([32, 64] if a.quick else [16, 32, 64])
    a.lengths_agents = a.lengths_agents or 16
    a.pool = a.pool or (32768 if a.quick else 65536)
    if a.rounds < 2:
        p.error("--rounds must be >= 2")
    return a


def grid(args) -> list[tuple[int, int]]:
    g = [(n, args.max_new_tokens) for n in args.agents]
    g += [(args.lengths_agents, L) for L in args.output_lengths if (args.lengths_agents, L) not in g]
    return g


def measure(args, srv, n: int, L: int, bpt: int, log) -> dict:
    w = C.make_workload(args, n, args.rounds, L)
    run = C.run_rounds(srv, w, max_new_tokens=L, last_round={"max_new_tokens": args.hold_tokens, "ignore_eos": True},
                       poll=0.1)
    last, prev = run["rounds"][-1], run["rounds"][-2]
    s, s_prev = last["stats_after"], prev["stats_after"]
    res = run["_result"].rounds[-1]
    evicted = s["used_slots"] < prev["stats_after"]["used_slots"]
    rec = {
        "n_agents": n,
        "output_length": L,
        "prompt_tokens_per_agent": statistics.fmean(a.prompt_tokens for a in res.agents),
        "shared_tokens_per_agent": statistics.fmean(a.shared_tokens for a in res.agents),
        "uncached_tokens_per_agent": statistics.fmean(a.prompt_tokens - a.cached_tokens for a in res.agents),
        "used_slots": s["used_slots"],
        "used_slots_before_round": s_prev["used_slots"],
        "max_total_num_tokens": s["max_total_num_tokens"],
        "peak_held_slots": last["peak_held_slots"],
        "peak_used_slots": last["peak_used_slots"],
        "stats_samples_in_round": last["stats_samples"],
        "held_kv_per_agent_bytes": last["peak_held_slots"] / n * bpt,
        "pool_kv_per_agent_bytes": s["used_slots"] / n * bpt,
        "round_increment_per_agent_bytes": (s["used_slots"] - s_prev["used_slots"]) / n * bpt,
        "possible_eviction": bool(evicted or s["available_size"] < 0.05 * s["max_total_num_tokens"]),
        "latency_s": [r["latency_s"] for r in run["rounds"]],
    }
    for k in ("master_slots", "master_copy_slots", "diff_slots", "segments", "reused_tokens", "recomputed_tokens"):
        if k in s:
            rec[k] = s[k]
    # docs/architecture.md, "Metrics": the slots a round's row held for its prompt and output, masters divided among their sharers.
    kr = row_kv_from_stats(s, s_prev, args.rounds - 1)
    kr_shared = row_kv_from_stats(s, s_prev, args.rounds - 1, field="shared_held_tokens")
    if kr is not None:
        rec["row_kv_per_agent_bytes"] = kr * bpt
        rec["row_kv_source"] = "kv_per_agent_by_round of /tokendance/stats (increase over the round)"
    else:
        rec["row_kv_per_agent_bytes"] = statistics.fmean(a.prompt_tokens + a.generated_tokens for a in res.agents) * bpt
        rec["row_kv_source"] = "prompt + generated tokens per agent (a radix row holds every token of its prompt)"
    if kr is not None and kr_shared is not None:
        rec["shared_kv_per_agent_bytes"] = kr_shared * bpt
    else:  # a radix row holds every token of the shared block itself
        rec["shared_kv_per_agent_bytes"] = rec["shared_tokens_per_agent"] * bpt
    cum, cum_prev = s.get("kv_bytes_by_agent_cumulative"), s_prev.get("kv_bytes_by_agent_cumulative") or {}
    if cum:
        per = [float(cum.get(str(i), 0.0)) - float(cum_prev.get(str(i), 0.0)) for i in range(n)]
        rec["beyond_prefix_kv_per_agent_bytes"] = statistics.fmean(per)
    else:
        rec["beyond_prefix_kv_per_agent_bytes"] = rec["uncached_tokens_per_agent"] * bpt
    log(f"  {srv.backend} N={n} L={L}: held at peak {last['peak_held_slots']} slots ({last['stats_samples']} polls), "
        f"used at the end {s['used_slots']} (+{s['used_slots'] - s_prev['used_slots']} in the round); per agent: held "
        f"{rec['held_kv_per_agent_bytes'] / 2**20:.2f} MiB, row {rec['row_kv_per_agent_bytes'] / 2**20:.2f} MiB, pool "
        f"{rec['pool_kv_per_agent_bytes'] / 2**20:.2f} MiB" + (" [possible eviction]" if rec["possible_eviction"] else ""))
    return rec


MEASURES = ("held_kv_per_agent_bytes", "row_kv_per_agent_bytes", "shared_kv_per_agent_bytes", "pool_kv_per_agent_bytes",
            "round_increment_per_agent_bytes", "beyond_prefix_kv_per_agent_bytes")


def row_kv_from_stats(s: dict, s_prev: dict, r: int, field: str = "tokens") -> float | None:
    """Mean ``field`` (tokens per row, or shared-region tokens held per row) of round ``r`` from
    ``kv_per_agent_by_round`` (cumulative over runs on one server, so the increase between the two reads)."""
    a = (s.get("kv_per_agent_by_round") or {}).get(str(r))
    if not a or not a.get("rows") or field not in a:
        return None
    b = (s_prev.get("kv_per_agent_by_round") or {}).get(str(r)) or {}
    rows = a["rows"] - b.get("rows", 0)
    if rows <= 0:
        return None
    return (a[field] * a["rows"] - b.get(field, 0.0) * b.get("rows", 0)) / rows


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    env = C.environment()
    backends, skipped = C.resolve_backends(args.backends, log)
    C.model_path(args)
    bpt = C.kv_bytes_per_token(args.model)
    settings_grid = grid(args)
    log(f"backends {backends}, (N, output length) {settings_grid}, {args.rounds} rounds, pool {args.pool} tokens, "
        f"{bpt['bytes']} KV bytes per token, workload sizes {C.workload_sizes(args) or 'default'}")
    results: dict[str, dict] = {}
    servers = {}
    for backend in backends:
        try:
            with C.server(args, backend, log, extra=["--max-total-tokens", str(args.pool)]) as srv:
                servers[backend] = srv.info
                results[backend] = {
                    f"{n}x{L}": measure(args, srv, n, L, bpt["bytes"], log)
                    for n, L in C.progress(settings_grid, desc=f"storage {backend}")
                }
        except Exception as e:  # noqa: BLE001  (a backend that fails is reported, the others still run)
            C.backend_failed(backend, e, skipped, log)
            results.pop(backend, None)

    compression = {}
    for key in (f"{n}x{L}" for n, L in settings_grid):
        td = results.get("tokendance", {}).get(key)
        row = {}
        for base in ("radix", "pic"):
            b = results.get(base, {}).get(key)
            if td and b:
                row[f"{base}_over_tokendance"] = {m: C.ratio(b[m], td[m]) for m in MEASURES}
        compression[key] = row

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "settings": {
            "backends": backends, "skipped_backends": skipped, "grid": [list(x) for x in settings_grid],
            "grid_key": "<N>x<output length>", "rounds": args.rounds, "measured_after_round": args.rounds - 1,
            "last_round_max_new_tokens": args.hold_tokens, "last_round_ignore_eos": True, "pool_tokens": args.pool, "kv_bytes_per_token": bpt,
            "style": args.style, "seed": args.seed, "workload_sizes": C.workload_sizes(args) or "workload defaults",
            "model": args.model, "server_args": args.server_arg,
            "measures": {
                "held_kv_per_agent_bytes": "peak over polls during the last round of (used_slots - evictable_size) / "
                                           "N * bytes per token",
                "pool_kv_per_agent_bytes": "used_slots / N * bytes per token, at idle after the last round",
                "round_increment_per_agent_bytes": "(used_slots after - before the last round) / N * bytes",
                "row_kv_per_agent_bytes": "docs/architecture.md, "Metrics": slots a round's row held for prompt and output, masters "
                                          "divided among sharers; tokendance/pic: kv_per_agent_by_round of the last "
                                          "round; radix: (prompt + generated tokens) per agent * bytes",
                "shared_kv_per_agent_bytes": "the row KV of the shared block alone (its segment spans): "
                                             "tokendance/pic: shared_held_tokens of kv_per_agent_by_round (master "
                                             "slots divided among sharers, diff slots whole); radix: the segment "
                                             "tokens of the prompt * bytes",
                "beyond_prefix_kv_per_agent_bytes": "tokendance/pic: kv_bytes_by_agent_cumulative increase over the "
                                                    "last round, mean over agents; radix: uncached prompt tokens * "
                                                    "bytes",
            },
        },
        "servers": servers,
        "results": results,
        "compression": compression,
        "environment": {**env, "loadavg_at_end": list(os.getloadavg())},
    }
    paths = [C.write_json(NAME, args.quick, data, args.out_dir)]
    if not args.no_plot:
        paths.append(plot(data, args, settings_grid))

    print(f"\n=== KV per agent (MiB: held at the peak of the round / row (docs/architecture.md, "Metrics") / shared block of the row / "
          f"pool used at the end), "
          f"{args.style}, {'quick' if args.quick else 'full'} size, round {args.rounds - 1}")
    head = f"{'N':>4}{'L':>5}" + "".join(f"{b:>30}" for b in results)
    head += "".join(f"{k:>30}" for k in ("radix / tokendance", "pic / tokendance"))
    print(head)
    for n, L in settings_grid:
        key = f"{n}x{L}"
        line = f"{n:>4}{L:>5}"
        for b in results:
            r = results[b][key]
            line += f"{' / '.join(f'{r[m] / 2**20:.2f}' for m, _ in SHOW):>30}"
        c = compression[key]
        for base in ("radix", "pic"):
            cc = c.get(f"{base}_over_tokendance")
            line += f"{' / '.join(C.fmt(cc[m]) for m, _ in SHOW) if cc else '-':>30}"
        print(line)
    if skipped:
        print(f"skipped: {skipped}")
    C.finish(log, NAME, paths)
    return 0


SHOW = (("held_kv_per_agent_bytes", "held at peak"), ("row_kv_per_agent_bytes", "row"),
        ("shared_kv_per_agent_bytes", "shared block of the row"), ("pool_kv_per_agent_bytes", "pool at end"))


def plot(data: dict, args, settings_grid) -> Path:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    mib = 2**20
    ns = [n for n, L in settings_grid if L == args.max_new_tokens]
    ls_ = sorted(L for n, L in settings_grid if n == args.lengths_agents)
    styles = {"held_kv_per_agent_bytes": ("o", "-"), "row_kv_per_agent_bytes": ("x", ":"),
              "shared_kv_per_agent_bytes": ("^", "-."), "pool_kv_per_agent_bytes": ("s", "--")}
    colors = {"radix": "C0", "pic": "C1", "tokendance": "C2"}
    for b, res in data["results"].items():
        for m, label in SHOW:
            mk, ls = styles[m]
            axes[0].plot(ns, [res[f"{n}x{args.max_new_tokens}"][m] / mib for n in ns], marker=mk, ls=ls,
                         color=colors.get(b), label=f"{b}, {label}")
            axes[1].plot(ls_, [res[f"{args.lengths_agents}x{L}"][m] / mib for L in ls_], marker=mk, ls=ls,
                         color=colors.get(b), label=f"{b}, {label}")
    axes[0].set_xlabel("agents N")
    axes[0].set_title(f"KV per agent, output length {args.max_new_tokens}")
    axes[1].set_xlabel("output length (tokens)")
    axes[1].set_title(f"KV per agent, N = {args.lengths_agents}")
    for ax in axes[:2]:
        ax.set_ylabel("MiB per agent")
        ax.legend(fontsize=7)
    for base in ("radix", "pic"):
        for m, label in SHOW:
            mk, ls = styles[m]
            ys = [data["compression"][f"{n}x{args.max_new_tokens}"].get(f"{base}_over_tokendance", {}).get(m)
                  for n in ns]
            if any(y is not None for y in ys):
                axes[2].plot(ns, [y if y is not None else float("nan") for y in ys], ls=ls, marker=mk,
                             color=colors[base], label=f"{base} / tokendance, {label}")
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set_xlabel("agents N")
    axes[2].set_ylabel("compression (x)")
    axes[2].set_title("KV per agent: baseline / tokendance")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=7)
    return C.save_figure(fig, NAME, args.quick, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
