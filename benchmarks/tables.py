"""Write the results tables from the benchmark JSON (no hand-typed figures).

    python benchmarks/tables.py [--quick] [--mode auto|full|quick] [--target FILE ...]

Every headline row ends with one sentence, computed from the same JSON, on what limits its ratio.

Reads benchmarks/results/{concurrency,concurrency_pool3k,storage,storage_sweep,storage_n16,storage_scale,prefill,prefill_sink2,
fidelity,fidelity_n8,fidelity_n8_dev15,overhead}[_quick].json (the tagged runs get headline rows of their own, when present) and writes a
Markdown block between the markers below into every ``--target`` (replacing an earlier block, appending one if the file has none, creating
the file if missing); by default benchmarks/results/RESULTS.md and the README's Benchmarks section.  ``--mode auto``
(the default) takes, per benchmark, the newer of the full-size and the quick JSON.  It is named to sort after the measuring scripts, so ``tokendance-sgl bench``
runs it last; ``--quick`` is accepted and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- BEGIN tokendance-sgl benchmark results (written by benchmarks/tables.py from the JSON; do not edit) -->"
END = "<!-- END tokendance-sgl benchmark results -->"
CONCURRENCY_RUNS = ("concurrency", "concurrency_pool3k")  # the default size, and a pool that binds at small N
STORAGE_RUNS = ("storage", "storage_sweep", "storage_n16")  # tagged runs at other settings get rows of their own when present
PREFILL_RUNS = ("prefill", "prefill_sink2")
FIDELITY_RUNS = ("fidelity", "fidelity_n8", "fidelity_n8_dev15")
BENCHMARKS = (*CONCURRENCY_RUNS, *STORAGE_RUNS, "storage_scale", *PREFILL_RUNS, *FIDELITY_RUNS, "overhead")
TARGETS = {"concurrency": 2.7, "storage": 17.5, "prefill_vs_pic": 1.3, "prefill_vs_radix": 3.0, "prefill_tokens": 8.0}
MiB = 2**20
STORAGE_MEASURES = ("row_kv_per_agent_bytes", "shared_kv_per_agent_bytes", "held_kv_per_agent_bytes")


def load(name: str, mode: str, results: Path = RESULTS) -> dict | None:
    cands = []
    for quick in (False, True):
        if (mode == "full" and quick) or (mode == "quick" and not quick):
            continue
        p = results / f"{name}{'_quick' if quick else ''}.json"
        if p.is_file():
            try:
                d = json.loads(p.read_text())
            except ValueError:
                continue
            d["_path"] = p.name
            cands.append(d)
    if not cands:
        return None
    return max(cands, key=lambda d: d.get("environment", {}).get("created", ""))


def f(x, nd=2, suffix="") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}{suffix}"
    return f"{x}{suffix}"


def xr(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def provenance(d: dict) -> str:
    e = d.get("environment", {})
    s = d.get("settings", {})
    load = e.get("loadavg_at_start")
    sizes = s.get("workload_sizes")
    skipped = s.get("skipped_backends") or {}
    pol = {b: i.get("recompute_policy") for b, i in (d.get("servers") or {}).items()
           if isinstance(i, dict) and i.get("recompute_policy")}
    policies = ("server recompute policy " + ", ".join(f"{b} `{p}`" for b, p in pol.items())) if pol else None
    parts = [
        f"`{d['_path']}`",
        "quick size" if d.get("quick") else "full size",
        f"{e.get('device', '?')}, {e.get('cpu_count', '?')} cores",
        (f"load average {load[0]:.1f} at start" + (f", {e['loadavg_at_end'][0]:.1f} at end" if e.get("loadavg_at_end")
                                                     else "")) if load else None,
        f"commit {str(e.get('git_commit'))[:10]}{' (+local changes)' if e.get('git_dirty_tracked_files') else ''}",
        f"{e.get('created', '?')}",
        f"workload {s.get('style')} seed {s.get('seed')}, sizes {sizes}" if sizes else None,
        policies,
        f"not run: {', '.join(skipped)}" if skipped else None,
    ]
    return "; ".join(p for p in parts if p)


def pick_n(keys: list[int], want: int) -> int | None:
    if not keys:
        return None
    return want if want in keys else min(keys, key=lambda k: (abs(k - want), -k))


# ----------------------------------------------------------------------------------------------------------- parts


def shared_limit(rec: dict, n: int) -> str:
    """What bounds the shared-history ratio of a storage record (one sentence)."""
    return (f"a master's share is divided among the {n} rows that read it, so at most {n}x; every agent's own "
            f"recomputed tokens (diffs) and the copies' last tokens take it to {rec['dense_over_shared']:.1f}x")


def row_limit(rec: dict, n: int) -> str:
    """What bounds the whole-row ratio: the row's own tokens (persona, tasks, chat turns) are held per agent by every
    backend, so even with no diffs the row cannot pass dense row / (own + dense shared / N)."""
    row, shared = rec["row_kv_per_agent_bytes"], rec["shared_kv_per_agent_bytes"]
    dense_row, dense_shared = row * rec["dense_over_row"], shared * rec["dense_over_shared"]
    own = dense_row - dense_shared
    bound = dense_row / (own + dense_shared / n) if own + dense_shared / n > 0 else float("nan")
    return (f"the agent's own {own / dense_row:.0%} of the row is held per agent on every backend: with no diffs at "
            f"all the row could not pass {bound:.1f}x")


def prefill_limit(p: dict, n: int, what: str) -> str:
    """What bounds a prefill ratio at N = n (one sentence, from the round's prefill work)."""
    td = (p["results"].get("tokendance", {}).get(str(n)) or {}).get("prefill_by_round") or {}
    if not td:
        return ""
    pic = (p["results"].get("pic", {}).get(str(n)) or {}).get("prefill_by_round") or {}
    vs_pic = (f"; pic computes {pic['computed_tokens']} and probes {pic.get('probe_tokens', 0)}"
              if pic else "")
    if what == "tokens":
        return (f"every agent still computes its recomputed positions and the labels between segments: "
                f"{td['prepass_tokens']} of the {td['computed_tokens']} tokens tokendance computes{vs_pic}")
    return (f"what tokendance still computes: {td['computed_tokens']} tokens ({td['prepass_tokens']} in the pre-pass, "
            f"whose queries attend to the whole row; {td.get('probe_tokens', 0)} probe tokens){vs_pic}")


def concurrency_limit(c: dict) -> str:
    """Why tokendance's sweep stopped: the pool or the round latency."""
    res = (c["results"].get("tokendance") or {}).get("sweep") or []
    miss = next((s for s in res if not s["meets_slo"]), None)
    if miss is None:
        return f"none seen: tokendance met the SLO up to N = {res[-1]['n_agents']} (the sweep's end)" if res else ""
    pool, n = c["settings"]["pool_tokens"], miss["n_agents"]
    used = miss["peak_used_slots"] / pool
    if used >= 0.95:
        return f"the KV pool: at N = {n} tokendance filled {used:.0%} of it and missed the SLO"
    return (f"round latency, not KV: at N = {n} tokendance used {used:.0%} of the pool and computed at most "
            f"{max(miss['uncached_tokens'][1:])} prompt tokens a round, yet took "
            f"{miss['measured_round_latency_max_s']:.1f} s (decode reads every agent's whole context every step, on "
            "every backend)")


def compression_rows(data: dict) -> list[list[str]]:
    """The paper's compression of the shared history (dense per-agent copies / what tokendance's rows hold), at the
    largest N of ``storage`` and of ``storage_scale`` (a tokendance-only run at an N whose radix run does not fit)."""
    rows = []
    for name in ("storage", "storage_sweep", "storage_scale"):
        s = data.get(name)
        res = (s or {}).get("results", {}).get("tokendance")
        if not res:
            continue
        n = max(map(int, res))
        last = res[str(n)][-1]
        if last.get("dense_over_shared") is None:
            continue  # (a storage JSON from before the measure)
        st = s["settings"]
        pol = ((s.get("servers") or {}).get("tokendance") or {}).get("recompute_policy", "?")
        pic = (s["results"].get("pic") or {}).get(str(n))
        rows.append([
            f"shared-history compression: dense per-agent copies / (master share + diffs), N = {n}, round "
            f"{st['rounds'] - 1}, {st['max_new_tokens']}-token outputs, `{pol}` (`{s['_path']}`)", "1.00x (dense)",
            xr(pic[-1].get("dense_over_shared")) if pic else "-", xr(last["dense_over_shared"]),
            xr(last["dense_over_shared"]), "",
            f">= {TARGETS['storage']}x at N = 32", shared_limit(last, n)])
    return rows


def _settings_label(d: dict, tagged: bool) -> str:
    """A tagged run's own settings, for its row labels (the default runs' settings are in the details)."""
    if not tagged:
        return ""
    pol = ((d.get("servers") or {}).get("tokendance") or {}).get("recompute_policy")
    st = d["settings"]
    return f"; {st.get('max_new_tokens', st.get('max_new_tokens_untimed'))}-token outputs, `{pol}`, `{d['_path']}`"


def storage_rows(s: dict | None, tagged: bool = False) -> list[list[str]]:
    if not (s and "workload" in s["settings"] and "tokendance" in s["results"]):
        return []
    rows, st = [], s["settings"]
    n = pick_n([int(k) for k in s["results"]["tokendance"]], 16)
    last = st["rounds"] - 1
    share = s["results"]["tokendance"][str(n)][last]["shared_fraction_of_prompt"]
    extra = _settings_label(s, tagged)
    for m, label in (("row_kv_per_agent_bytes", "whole row"),
                     ("shared_kv_per_agent_bytes", "the row's shared history (the paper's compression)")):
        vals = [s["results"].get(b, {}).get(str(n), [{}] * (last + 1))[last].get(m) for b in ("radix", "pic",
                                                                                               "tokendance")]
        comp = {b: (s["compression"].get(f"{b}_over_tokendance") or {}).get(str(n)) for b in ("radix", "pic")}
        rows.append([
            f"KV per agent, MiB ({label}), N = {n}, round {last} ({st['workload']} workload, shared history "
            f"{share:.0%} of the prompt{extra})",
            *(f(v / MiB if v is not None else None) for v in vals),
            *(xr(c[last][m]) if c else "-" for c in comp.values()),
            f">= {TARGETS['storage']}x at N = 32" if m.startswith("shared") else ">= 5x less than radix at N = 16",
            (shared_limit if m.startswith("shared") else row_limit)(s["results"]["tokendance"][str(n)][last], n),
        ])
    return rows


def prefill_rows(p: dict | None, tagged: bool = False) -> list[list[str]]:
    if not p:
        return []
    ns = sorted(int(k) for k in next(iter(p["results"].values()), {}))
    n = pick_n(ns, 16)
    if n is None:
        return []
    vals = {b: p["results"].get(b, {}).get(str(n), {}) for b in ("radix", "pic", "tokendance")}
    rr = p["ratios"].get(str(n), {})
    extra = _settings_label(p, tagged)
    return [[
        f"prefill time of round {p['settings']['timed_round']}, s (wall), N = {n}{extra}",
        *(f(v.get("latency_s")) for v in vals.values()),
        xr(rr.get("radix_over_tokendance", {}).get("latency")),
        xr(rr.get("pic_over_tokendance", {}).get("latency")),
        f">= {TARGETS['prefill_vs_radix']:g}x faster than radix, >= {TARGETS['prefill_vs_pic']:g}x than pic "
        f"(`deviation:0.15`), N = 16", prefill_limit(p, n, "time"),
    ], [
        f"prefill work: uncached prompt tokens of the round, N = {n}{extra}",
        *(f(v.get("uncached_tokens")) for v in vals.values()),
        xr(rr.get("radix_over_tokendance", {}).get("uncached_tokens")),
        xr(rr.get("pic_over_tokendance", {}).get("uncached_tokens")),
        f">= {TARGETS['prefill_tokens']:g}x fewer than radix at N = 16", prefill_limit(p, n, "tokens"),
    ]]


def same_budget(cmp_: dict) -> bool:
    """Whether tokendance and pic recomputed the same fraction of the block, as the comparison needs (a JSON from
    before ``equal_budget`` was recorded is judged by the same rule)."""
    if "equal_budget" in cmp_:
        return cmp_["equal_budget"]
    from fidelity import equal_budget

    return equal_budget(cmp_["tokendance"]["recompute_fraction"], cmp_["pic"]["recompute_fraction"])


def fidelity_rows(fi: dict | None, tagged: bool = False) -> list[list[str]]:
    rows: list[list[str]] = []
    if not fi:
        return rows
    st = fi["settings"]
    extra = f"; {st['agents']} agents, round {st['rounds'] - 1}, `{fi['_path']}`" if tagged else ""
    for pol in st["policies"]:
        cells = {}
        for b in ("pic", "tokendance"):
            x = fi["results"].get(b, {}).get("policies", {}).get(pol)
            if x and "top1" in x:
                cells[b] = f"{x['top1']:.3f} / {max(0.0, x['kl']):.4f} ({f(x['recompute_fraction'], 2)})"
            elif x:
                cells[b] = "refused"
        if not cells:
            continue
        cmp_ = fi["comparison"].get(pol)
        comparable = cmp_ is not None and same_budget(cmp_)
        if cmp_ is None:
            verdict = "-"
        elif not comparable:
            verdict = "not comparable: different budgets"
        else:
            verdict = (("as good or better" if cmp_["tokendance_at_least_as_good"] else "worse")
                       + f" (top-1 {cmp_['delta_top1']:+.3f}, KL {cmp_['delta_kl']:+.4f})")
        if pol == "full":
            limit = "exact: nothing is reused"
        elif cmp_ is not None and not comparable:
            limit = (f"pic recomputed {f(cmp_['pic']['recompute_fraction'], 3)} of the block, tokendance "
                     f"{f(cmp_['tokendance']['recompute_fraction'], 3)} (a probe without pool room keeps only the "
                     "static positions)")
        elif "deviation" in pol:
            limit = ("tokendance measures the deviation once per segment on one pilot agent and every agent recomputes "
                     "those positions; pic measures every agent in its own context")
        else:
            limit = "the reused KV is approximate: each agent's cached path carries it into the later rounds"
        rows.append([f"fidelity `{pol}`: top-1 / KL vs exact (fraction recomputed){extra}", "1.000 / 0 (exact)",
                     cells.get("pic", "-"), cells.get("tokendance", "-"), "", verdict,
                     "tokendance >= pic at the same budget", limit])
    return rows


def headline(data: dict) -> list[str]:
    rows = []
    for c in (data.get(name) for name in CONCURRENCY_RUNS):
        if not c:
            continue
        res, st = c["results"], c["settings"]

        def mx(b):
            r = res.get(b)
            return None if r is None else f"{r['max_agents_under_slo']}{'+' if r['censored'] else ''}"

        rows.append([
            f"agents under the SLO (pool {st['pool_tokens']} tokens, {st['rounds']} rounds of {st['max_new_tokens']}-"
            f"token answers, SLO {st['slo_multiple']:g}x single-agent round latency = {f(st['slo_s'])} s; "
            f"`{c['_path']}`)", mx("radix") or "-", mx("pic") or "-", mx("tokendance") or "-",
            xr(c["ratios"].get("tokendance_over_radix")), xr(c["ratios"].get("tokendance_over_pic")),
            f">= {TARGETS['concurrency']}x radix", concurrency_limit(c)])
    for i, name in enumerate(STORAGE_RUNS):
        rows += storage_rows(data.get(name), tagged=i > 0)
    rows += compression_rows(data)
    for i, name in enumerate(PREFILL_RUNS):
        rows += prefill_rows(data.get(name), tagged=i > 0)
    for i, name in enumerate(FIDELITY_RUNS):
        rows += fidelity_rows(data.get(name), tagged=i > 0)
    if not rows:
        return ["No benchmark results yet: run `make bench` (or the scripts in benchmarks/)."]
    return table(["measure", "radix", "pic", "tokendance", "tokendance vs radix", "tokendance vs pic", "paper target",
                  "what limits the ratio"], rows)


def details(data: dict) -> list[str]:
    out: list[str] = []
    c = data.get("concurrency")
    if c:
        st = c["settings"]
        out += ["", f"**Agents under the SLO** ({provenance(c)}). Pool {st['pool_tokens']} KV tokens per server; SLO = "
                    f"{st['slo_multiple']:g} x the single-agent round latency on {st['slo_reference_backend']} "
                    f"= {f(st['slo_s'])} s, applied to {st['slo_rounds']}; {st['rounds']} rounds of "
                    f"{st['max_new_tokens']} new tokens. Worst round latency (s) per N, `!` = missed:", ""]
        ns = sorted({s["n_agents"] for r in c["results"].values() for s in r["sweep"]})
        rows = []
        for b, r in c["results"].items():
            by = {s["n_agents"]: s for s in r["sweep"]}
            rows.append([b, f(r["single_agent_round_latency_s"])] + [
                (f"{by[n]['measured_round_latency_max_s']:.1f}{'' if by[n]['meets_slo'] else '!'} "
                 f"({by[n]['peak_used_slots']})") if n in by else "" for n in ns])
        out += table(["backend", "1 agent"] + [f"N={n} (peak slots)" for n in ns], rows)
    s = data.get("storage")
    if s and "workload" in s["settings"]:  # (an older storage JSON, before the history workload, is left out)
        st = s["settings"]
        out += ["", f"**KV per agent** ({provenance(s)}). {st['workload']} workload, {st['rounds']} rounds of "
                    f"{st['max_new_tokens']}-token outputs; {st['kv_bytes_per_token']['bytes']} bytes of K+V per "
                    f"token; pool {st['pool_tokens']} tokens. MiB per agent in the last round: whole row / its shared "
                    f"history (masters divided among their users) / held at the peak of the round; tokendance@P: "
                    f"page size P (pages copied on write per round):", ""]
        keys = list(s["results"])
        rows = []
        for n in map(str, st["agents"]):
            row = [n]
            for k in keys:
                r = s["results"][k].get(n)
                if not r:
                    row.append("-")
                    continue
                cell = " / ".join(f(r[-1].get(m) / MiB) for m in STORAGE_MEASURES)
                if "@" in k:
                    cell += f" ({', '.join(str(x['cow_pages']) for x in r)})"
                row.append(cell)
            for base in ("radix", "pic"):
                cc = (s["compression"].get(f"{base}_over_tokendance") or {}).get(n)
                row.append("-" if not cc else " / ".join(xr(cc[-1].get(m)) for m in STORAGE_MEASURES))
            rows.append(row)
        out += table(["N", *keys, "radix / tokendance", "pic / tokendance"], rows)
    p = data.get("prefill")
    if p:
        st = p["settings"]
        out += ["", f"**Prefill time per round** ({provenance(p)}). Round {st['timed_round']} timed with "
                    f"max_new_tokens=1 after {st['timed_round']} normal round(s) of {st['max_new_tokens_untimed']} new "
                    f"tokens; median of {st['repeats']} (min-max in brackets). Wall s / server CPU s / uncached "
                    "tokens:", ""]
        bs = list(p["results"])
        rows = []
        for n in map(str, st["agents"]):
            row = [n]
            for b in bs:
                r = p["results"][b][n]
                row.append(f"{r['latency_s']:.2f}{_spread(r.get('latency_s_all'))} / {r['server_cpu_s']:.1f} / "
                           f"{r['uncached_tokens']}")
            rr = p["ratios"].get(n, {})
            for base in ("pic", "radix"):
                cc = rr.get(f"{base}_over_tokendance")
                row.append("-" if not cc else f"{xr(cc['latency'])}{_spread(cc.get('latency_min_max'), 'x')} / "
                                              f"{xr(cc['server_cpu'])} / {xr(cc['uncached_tokens'])}")
            rows.append(row)
        out += table(["N", *bs, "pic / tokendance", "radix / tokendance"], rows)
    fi = data.get("fidelity")
    if fi:
        st = fi["settings"]
        out += ["", f"**Fidelity against exact prefill** ({provenance(fi)}). {st['agents']} agents, "
                    f"{st['rounds']} rounds (each policy one run of its own, every round replayed with the exact "
                    f"prompts), segments up to {st['segment_tokens_max']} tokens; teacher-forced over the task tokens "
                    f"(KL over the exact run's top-{st['top_k']}), greedy over the first {st['probe_tokens']} tokens; "
                    "\"diverges\": the first round whose greedy outputs differ from exact (where a free-running run "
                    "leaves the exact trace):", ""]
        rows = []
        for b, r in fi["results"].items():
            copies = "-" if r.get("copy_slots_made") is None else str(r["copy_slots_made"])
            for pol, x in r["policies"].items():
                if "top1" not in x:
                    rows.append([b, f"`{pol}`", "refused", "", "", "", "", "", "", copies])
                    continue
                for y in x.get("by_round") or [{**x, "round": st["probed_round"]}]:
                    last = y["round"] == x["round"] if "round" in x else True
                    rows.append([b, f"`{pol}`", str(y["round"]), f(y["recompute_fraction"], 3), f"{y['top1']:.3f}",
                                 f"{max(0.0, y['kl']):.4f}", f"{y['greedy']:.2f}", str(y["uncached_tokens"]),
                                 _diverges(x) if last else "", copies if last else ""])
        out += table(["backend", "policy", "round", "fraction recomputed", "top-1", "KL", "greedy", "uncached tokens",
                      "diverges", "copy slots made over the run"], rows)
    out += overhead_table(data.get("overhead"))
    return out


def _spread(xs: list | None, unit: str = "", *, inside: bool = False) -> str:
    """`` (lo-hi)`` over repeats, when there were several (``inside``: ``, lo-hi`` for a parenthesis already open)."""
    xs = [x for x in xs or [] if x is not None]
    if len(xs) < 2 or min(xs) == max(xs):
        return ""
    return f", {min(xs):.2f}-{max(xs):.2f}{unit}" if inside else f" ({min(xs):.2f}-{max(xs):.2f}{unit})"


def _diverges(x: dict) -> str:
    if "by_round" not in x:  # a result of the last-round-only probe
        return "-"
    return "none" if x["first_divergent_round"] is None else str(x["first_divergent_round"])


def overhead_table(o: dict | None) -> list[str]:
    if not o:
        return []
    repeats = o.get("repeats", 1)
    over = f", then over {repeats} interleaved repeats (ratio spread: within each repeat)" if repeats > 1 else ""
    out = ["", f"**Scheduler time per round** ({provenance(o)}). The cache calls SGLang's scheduler makes, over its "
               f"real allocator and request pool with a fake forward (no model); groups of {o['segments']} agents "
               f"gather each other's outputs every round; median over rounds 1..{o['rounds'] - 1}{over}, ms per round "
               f"(/ radix):", ""]
    backends = list(dict.fromkeys(r["backend"] for r in o["rows"]))
    rows = []
    for n, hist in dict.fromkeys((r["agents"], r["history"]) for r in o["rows"]):
        row = [str(n), str(hist)]
        for b in backends:
            r = next(x for x in o["rows"] if (x["backend"], x["agents"], x["history"]) == (b, n, hist))
            ms = f"{r['median_round_s'] * 1e3:.1f}"
            spread = _spread(r.get("vs_radix_repeats"), "x", inside=True)
            row.append(ms if b == "radix" else f"{ms} ({xr(r['vs_radix'])}{spread})")
        rows.append(row)
    out += table(["agents", "history tokens", *backends], rows)
    growth = ", ".join(f"{b} {g:.2f}" for b, g in o["growth_exponent"].items() if g is not None)
    out += ["", f"Growth exponent of the time in agents x history tokens (log-log fit): {growth}."]
    reads = {b: max(sum(r["device_reads_per_request"].values()) for r in o["rows"] if r["backend"] == b)
             for b in backends if all("device_reads_per_request" in r for r in o["rows"] if r["backend"] == b)}
    if reads:
        out += ["", "Device reads per request on the scheduler path (tensor values copied to the host; on a GPU each "
                    "waits for the stream), the most over the sizes: "
                    + ", ".join(f"{b} {v:.2f}" for b, v in reads.items()) + "."]
    big = max(o["rows"], key=lambda r: r["agents"] * r["history"])
    gcs = {r["backend"]: r["gc_collections_per_round"] for r in o["rows"]
           if (r["agents"], r["history"]) == (big["agents"], big["history"]) and "gc_collections_per_round" in r}
    if gcs:
        out += ["", f"Python garbage collections inside the timed calls per round at {big['agents']} x "
                    f"{big['history']} (each scans what the round allocated and still holds): "
                    + ", ".join(f"{b} {v:.1f}" for b, v in gcs.items()) + "."]
    return out


def render(data: dict) -> str:
    lines = [BEGIN, "", "Measured side by side in one run per benchmark on the same machine; on CPU only the ratios "
                        "mean something, not the absolute times. Ratio columns: agents = tokendance / baseline; KV, "
                        "time and tokens = baseline / tokendance; above 1 means tokendance is better.", ""]
    lines += headline(data)
    lines += details(data)
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_block(target: Path, block: str) -> None:
    text = target.read_text() if target.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block.rstrip("\n") + tail
    elif text:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        text = "# tokendance-sgl benchmark results\n\n" + block
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="accepted for `tokendance-sgl bench`; no effect")
    ap.add_argument("--mode", choices=("auto", "full", "quick"), default="auto")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON are (default %(default)s)")
    ap.add_argument("--target", type=Path, action="append", default=None,
                    help="file to write the block into, repeatable (default <results-dir>/RESULTS.md and, with the "
                         "default results dir, the README's Benchmarks section)")
    ap.add_argument("--print", action="store_true", help="also print the block")
    args = ap.parse_args(argv)
    if not args.target:
        args.target = [args.results_dir / "RESULTS.md"]
        if args.results_dir.resolve() == RESULTS and README.is_file():
            args.target.append(README)
    data = {name: d for name in BENCHMARKS if (d := load(name, args.mode, args.results_dir)) is not None}
    block = render(data)
    for target in args.target:
        write_block(target, block)
    print("\n".join(headline(data)))
    if args.print:
        print(block)
    print(f"[tables] wrote the results block ({', '.join(d['_path'] for d in data.values()) or 'no JSON yet'}) "
          f"into {', '.join(map(str, args.target))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
