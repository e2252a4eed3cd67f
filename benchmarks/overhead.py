"""Scheduler-side CPU time per round at scale, for radix, pic and tokendance: SGLang's real request pool, KV
allocator and request lifecycle (``init_next_round_input``, ``init_load_back``, ``checkpoint_kv_cache``,
``release_kv_cache``) over each backend's cache, with a fake forward (no model, no KV buffers).

    python benchmarks/overhead.py [--quick] [--agents 16 32 64] [--history 1024 2048 4096] [--segments 16]
                                  [--rounds 4] [--repeats 3] [--backends radix pic tokendance]

The workload has the paper's shape: every agent keeps its whole history (its cached path) and each round appends a
block with the outputs of the round before of every agent of its group (groups of ``--segments`` agents, one
all-gather each; a segment table as the frontend sends it) and its own answer; output lengths are chosen so that the
last round's prompt holds ``--history`` tokens. A round admits every agent (the collective step first, for the reuse
backends), then finishes them. Timed: the cache calls the scheduler makes (match, collective step, composition /
load-back, allocation with eviction, checkpoint, release); not timed: the fake forward (the re-rotation and copy
kernels are no-ops here, they are device work on a GPU), the harness and a ``gc.collect()`` between repeats (the
previous runs' caches are garbage). Every size runs ``--repeats`` times; within a repeat the backends run side by
side, round by round (radix's round r, then pic's, then tokendance's), so a slow spell of the machine hits them
alike. Reported per backend and size: the median over the repeats of the median over the rounds >= 1 of the round's
scheduler time, its ratio to radix (and the ratio within each repeat), the mean per round >= 1 of each phase
(``phases_s``, median over the repeats), and the growth exponent of the time in agents x history tokens (a log-log
fit). Also counted, per phase: the tensor reads that come to the host (``tokendance_sgl.host.to_host``; each waits for
the device stream on a GPU), per request of the rounds >= 1 (``device_reads_per_request``, the same in every repeat);
and Python's garbage collections inside the timed calls per round >= 1 (``gc_collections_per_round``: they scan the
objects the round allocated, so a backend that allocates more pays for more of them).

Writes benchmarks/results/overhead[_quick].json and .png.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tokendance_sgl.host import DeviceReads, to_host  # noqa: E402
from tokendance_sgl.slot_mirror import note_extend  # noqa: E402

NAME = "overhead"
PERSONA, TASK = 64, 16


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the size `make bench` runs (the default sizes; no model)")
    p.add_argument("--backends", nargs="+", default=list(C.ALL_BACKENDS), choices=list(C.ALL_BACKENDS))
    p.add_argument("--out-dir", type=Path, default=None, help=f"where results go (default {C.RESULTS})")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--agents", type=int, nargs="+", default=None, help="N values (default 16 32 64)")
    p.add_argument("--history", type=int, nargs="+", default=None,
                   help="tokens of an agent's last-round prompt (default 1024 2048 4096)")
    p.add_argument("--segments", type=int, default=16, help="gathered outputs per round block (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 4: three measured)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every size and backend, interleaved (default 3; the median is reported)")
    return p.parse_args(argv)


def _collections() -> int:
    return sum(g["collections"] for g in gc.get_stats())


class Harness:
    """One cache over SGLang's request pool and allocator; ``kv`` is not kept (nothing reads it)."""

    def __init__(self, backend: str, pool_tokens: int, rows: int, ctx: int):
        from sglang.srt.runtime_context import get_context, get_serving

        try:
            get_serving()
        except Exception:  # release_kv_cache reads the serving config: publish SGLang's defaults once
            get_context().override_server_args().install()
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.mem_cache.radix_cache import RadixCache

        from tokendance_sgl.collective_tree import CollectiveTree
        from tokendance_sgl.config import TreeConfig
        from tokendance_sgl.pic import PicCache

        self.pool = ReqToTokenPool(size=rows, max_context_len=ctx, device="cpu", enable_memory_saver=False)
        self.alloc = TokenToKVPoolAllocator(size=pool_tokens, dtype=torch.float32, device="cpu", kvcache=None,
                                            need_sort=False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.pool, token_to_kv_pool_allocator=self.alloc,
                                 page_size=1)
        if backend == "radix":
            self.tree = RadixCache(params)
        else:
            cls = CollectiveTree if backend == "tokendance" else PicCache
            self.tree = cls(params, TreeConfig(), copy_fn=lambda src, dst: None, bytes_per_token=8.0)
            self.tree.rerotate_into = lambda src, dst, delta: None  # device work on a GPU: not scheduler time
            self.tree.store.rerotate = self.tree.rerotate_into
        self.backend = backend
        self.timed = dict.fromkeys(("match", "collect", "load_back", "alloc", "checkpoint", "release"), 0.0)
        self.reads = dict.fromkeys(self.timed, 0)  # tensor reads to the host, by phase
        self._reads = None  # the DeviceReads counting them (SizeRun)
        self.gc_collections = 0  # Python's garbage collections inside the timed calls (any generation)

    def _t(self, phase: str, fn, *args, **kwargs):
        n0 = self._reads.total if self._reads is not None else 0
        gc0 = _collections()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timed[phase] += time.perf_counter() - t0
        self.gc_collections += _collections() - gc0
        if self._reads is not None:
            self.reads[phase] += self._reads.total - n0
        return out

    def _alloc(self, n: int):
        def go():
            self.alloc.evict_to_free_tokens(self.tree, n) if hasattr(self.alloc, "evict_to_free_tokens") else None
            return self.alloc.alloc(n)
        out = self._t("alloc", go)
        if out is None:
            raise RuntimeError(f"the pool ran out ({n} tokens wanted): raise pool_tokens")
        return out

    def _note_extend(self, idx, start, n, prefix, slots):
        """What the hook after SGLang's ``write_cache_indices`` does (reuse backends: their row mirror)."""
        rows = getattr(self.tree, "row_mirror", None)
        if rows is not None:
            note_extend(rows, slots, [idx], [start], [n - start], [prefix])

    def _note_decode(self, idx, start, slots):
        """What the hook after SGLang's ``alloc_for_decode`` does, for the decode steps of one request (one call: a
        step's hook takes the whole batch at once)."""
        rows = getattr(self.tree, "row_mirror", None)
        if rows is not None:
            rows.write(idx, start, to_host(slots, torch.int64))

    def round(self, prompts: list, tables: list, outputs: list) -> None:
        """Admits every agent's prompt, 'computes' it, appends its output and finishes it."""
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
        from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams
        from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
        from sglang.srt.sampling.sampling_params import SamplingParams

        reqs = [Req(f"r{id(p)}-{i}", "", array("q", p), SamplingParams(max_new_tokens=len(o), custom_params=t))
                for i, (p, t, o) in enumerate(zip(prompts, tables, outputs))]
        collector = getattr(self.tree, "collector", None)
        if collector is not None:
            self._t("collect", collector.collect, reqs)
        for req in reqs:
            self._t("match", req.init_next_round_input, self.tree)
            self.pool.alloc([req])
            pin = self.tree.lock(req.last_node)
            if req.host_hit_length > 0:
                loaded, node = self._t("load_back", self.tree.init_load_back, InitLoadBackParams(
                    best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req))
                req.last_node = node
                if loaded:
                    req.prefix_len += loaded
                    req.kv.cache_protected_len = req.prefix_len
            req.lock = self.tree.lock(req.last_node)
            self.tree.unlock(pin)
            n, start = len(req.origin_input_ids), req.prefix_len
            rest = self._alloc(n - start)
            idx = req.kv.req_pool_idx
            prefix = self.tree.prefix_device_indices(req) if start else None
            if start:
                self.pool.write((idx, slice(0, start)), prefix)
            self.pool.write((idx, slice(start, n)), rest)
            self._t("alloc", self._note_extend, idx, start, n, prefix, rest)  # (the row mirror's hook)
            plan = getattr(getattr(req, "td", None), "row_plan", None)
            if plan is not None:  # the pre-pass (fake forward)
                plan.pending = False
                for seg, _row in plan.tails:
                    seg.tail_pending, seg.tail_writer = False, None
            req.kv.kv_allocated_len = req.kv.kv_committed_len = n
            req.extend_end = n
            req.output_ids.append(outputs[reqs.index(req)][0])
            self._t("checkpoint", checkpoint_kv_cache, req, self.tree)
        for req, out in zip(reqs, outputs):  # decode (fake): the output's slots, then finish
            n = req.kv.kv_committed_len
            slots = self._alloc(len(out) - 1)
            self.pool.write((req.kv.req_pool_idx, slice(n, n + len(out) - 1)), slots)
            self._t("alloc", self._note_decode, req.kv.req_pool_idx, n, slots)  # (the row mirror's hook, per step)
            req.output_ids.extend(out[1:])
            req.kv.kv_allocated_len = req.kv.kv_committed_len = n + len(out) - 1
            req.finished_reason = FINISH_LENGTH(length=len(out))
            self._t("release", release_kv_cache, req, self.tree, checkpoint=True)


def output_length(history: int, segments: int, rounds: int) -> int:
    """L such that the last round's prompt holds about ``history`` tokens (module docstring)."""
    return max(16, (history - PERSONA - (rounds - 1) * TASK) // ((rounds - 1) * segments + rounds - 1))


class SizeRun:
    """One backend's run of one size, a round per :meth:`step` (so that the backends' rounds can interleave): the same
    seed gives every backend the same prompts and outputs."""

    def __init__(self, backend: str, n: int, history: int, segments: int, rounds: int, seed: int = 0):
        self.backend, self.n, self.history, self.segments, self.rounds = backend, n, history, segments, rounds
        self.rng = np.random.default_rng(seed)
        self.seg_len = output_length(history, segments, rounds)
        pool_tokens = n * (history + 2 * self.seg_len) * 2 + 4096
        self.h = Harness(backend, pool_tokens, rows=n + 1, ctx=history + 4 * self.seg_len + 256)
        self.h._reads = DeviceReads()  # counting only inside a step
        self.prompts = [self._toks(PERSONA) for _ in range(n)]
        self.last_out: list = [None] * n
        self.per_round, self.prompt_tokens = [], []
        self.phases, self.reads = dict.fromkeys(self.h.timed, 0.0), dict.fromkeys(self.h.timed, 0.0)
        self.gc_collections = 0  # garbage collections inside the timed calls of the rounds >= 1
        self.r = 0

    def _toks(self, k: int) -> list:
        return self.rng.integers(100, 49000, size=k).tolist()

    @property
    def done(self) -> bool:
        return self.r >= self.rounds

    def step(self) -> None:
        """Builds round ``r``'s prompts (the history, the block, the task) and runs the round."""
        h, r, n, segments, last_out = self.h, self.r, self.n, self.segments, self.last_out
        tables, full = [], []
        for i in range(n):
            p = list(self.prompts[i])
            if last_out[i] is not None:
                p += last_out[i]  # its own answer stays in its history
            table = {"td_round": r, "td_agent": i, "td_out_seg": f"r{r}/a{i}"}
            if r > 0:  # the block: the last round's outputs of every agent of its group, in the group's order
                ids, starts, ends = [], [], []
                group = i // segments * segments
                for a in range(group, min(group + segments, n)):
                    ids.append(f"r{r - 1}/a{a}")
                    starts.append(len(p))
                    p += last_out[a]
                    ends.append(len(p))
                table.update(td_seg_ids=ids, td_seg_starts=starts, td_seg_ends=ends)
            p += self._toks(TASK)
            tables.append(table)
            full.append(p)
        outs = [self._toks(self.seg_len) for _ in range(n)]
        before, reads_before, gcs_before = dict(h.timed), dict(h.reads), h.gc_collections
        with h._reads:
            h.round(full, tables, outs)
        self.per_round.append(sum(h.timed.values()) - sum(before.values()))
        if r > 0:  # as the median: round 0 has no block (and pays the lazy imports)
            for k in self.phases:
                self.phases[k] += (h.timed[k] - before[k]) / (self.rounds - 1)
                self.reads[k] += h.reads[k] - reads_before[k]
            self.gc_collections += h.gc_collections - gcs_before
        self.prompt_tokens.append(statistics.mean(len(p) for p in full))
        self.prompts, self.last_out = full, outs
        self.r += 1

    def result(self) -> dict:
        n, rounds, tree = self.n, self.rounds, self.h.tree
        return {"backend": self.backend, "agents": n, "history": self.history, "segment_tokens": self.seg_len,
                "segments": min(self.segments, n), "round_s": self.per_round,
                "prompt_tokens_by_round": self.prompt_tokens, "median_round_s": statistics.median(self.per_round[1:]),
                "phases_s": self.phases,
                "device_reads_per_request": {k: v / (n * (rounds - 1)) for k, v in self.reads.items()},
                "gc_collections_per_round": self.gc_collections / (rounds - 1),
                "reused_tokens": tree.stats.counters["reused_tokens"] if self.backend != "radix" else 0}


def run_size(backend: str, n: int, history: int, segments: int, rounds: int, seed: int = 0) -> dict:
    """One backend's whole run of one size (:class:`SizeRun`)."""
    run = SizeRun(backend, n, history, segments, rounds, seed)
    while not run.done:
        run.step()
    return run.result()


def combine_repeats(runs: list, radix: list | None) -> dict:
    """One row for a backend and size from its repeats: the median of the repeats' round times (and of each phase),
    its ratio to radix's, and the ratio within each repeat (``vs_radix_repeats``: the spread)."""
    out = dict(runs[0])
    out["repeat_round_s"] = [r["median_round_s"] for r in runs]
    out["median_round_s"] = statistics.median(out["repeat_round_s"])
    out["phases_s"] = {k: statistics.median(r["phases_s"][k] for r in runs) for k in runs[0]["phases_s"]}
    out["gc_collections_per_round"] = statistics.median(r["gc_collections_per_round"] for r in runs)
    if radix:
        out["vs_radix"] = C.ratio(out["median_round_s"], statistics.median(r["median_round_s"] for r in radix))
        out["vs_radix_repeats"] = [C.ratio(r["median_round_s"], b["median_round_s"]) for r, b in zip(runs, radix)]
    else:
        out["vs_radix"] = None
    return out


def growth_exponent(rows: list) -> float | None:
    if len(rows) < 2:
        return None
    x = np.log([r["agents"] * r["history"] for r in rows])
    y = np.log([r["median_round_s"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


COLORS = {"radix": "tab:blue", "pic": "tab:orange", "tokendance": "tab:green"}
STYLES = ("-", "--", ":")


def plot(rows: list, backends: list, quick: bool, out_dir):
    """Left: time per round against agents (one colour per backend, one line style per history length). Right: the
    ratio to radix against agents at each history length."""
    plt = C.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    histories = sorted({r["history"] for r in rows}, reverse=True)
    for be in backends:
        for hist, ls in zip(histories, STYLES):
            mine = sorted((r for r in rows if r["backend"] == be and r["history"] == hist), key=lambda r: r["agents"])
            a.plot([r["agents"] for r in mine], [r["median_round_s"] * 1e3 for r in mine], ls, marker="o",
                   color=COLORS.get(be), label=f"{be}, {hist} tokens")
            if be != "radix":
                b.plot([r["agents"] for r in mine], [r["vs_radix"] for r in mine], ls, marker="o", color=COLORS.get(be),
                       label=f"{be}, {hist} tokens")
    a.set_xlabel("agents")
    a.set_ylabel("scheduler time per round (ms)")
    a.set_title("Scheduler-side cache time per round (fake forward)")
    a.legend(fontsize=7)
    b.axhline(2.0, color="grey", ls="--", lw=1, label="target: 2x radix")
    b.set_ylim(bottom=0)
    b.set_xlabel("agents")
    b.set_ylabel("time / radix's time (same run)")
    b.set_title("Ratio to radix")
    b.legend(fontsize=7)
    return C.save_figure(fig, NAME, quick, out_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = C.Log(NAME)
    agents = args.agents or [16, 32, 64]
    history = args.history or [1024, 2048, 4096]
    rounds = args.rounds or 4
    backends = list(args.backends)
    sizes = [(n, hist) for n in agents for hist in history]
    rows = []
    for n, hist in C.progress(sizes, desc="sizes"):
        runs: dict = {be: [] for be in backends}
        for _rep in range(args.repeats):
            gc.collect()  # the previous runs' caches are garbage: not this run's scheduler time
            live = {be: SizeRun(be, n, hist, args.segments, rounds) for be in backends}
            for _r in range(rounds):  # the backends interleaved round by round: a slow spell of the machine hits
                for be in backends:  # them alike
                    live[be].step()
            for be in backends:
                runs[be].append(live[be].result())
            del live
        for be in backends:
            rows.append(combine_repeats(runs[be], runs.get("radix")))
            each = " ".join(f"{t * 1e3:.1f}" for t in rows[-1]["repeat_round_s"])
            log(f"{be:10s} N={n:3d} history={hist:5d}: {rows[-1]['median_round_s'] * 1e3:8.1f} ms per round "
                f"(repeats: {each})")
    growth = {be: growth_exponent([r for r in rows if r["backend"] == be]) for be in backends}
    data = {"benchmark": NAME, "quick": args.quick, "environment": C.environment(), "rounds": rounds, "segments": args.segments,
            "repeats": args.repeats, "rows": rows, "growth_exponent": growth,
            "notes": "scheduler-side cache calls only, fake forward; median over rounds >= 1 of each run, then over the "
                     "repeats (backends interleaved round by round); ratios within one repeat"}
    path = C.write_json(NAME, args.quick, data, args.out_dir)
    png = None if args.no_plot else plot(rows, backends, args.quick, args.out_dir)
    log(f"wrote {path}" + (f" and {png}" if png else ""))
    print("\nsummary (ms per round; x radix):")
    for n, hist in sizes:
        cells = []
        for be in backends:
            r = next(x for x in rows if (x["backend"], x["agents"], x["history"]) == (be, n, hist))
            vs = f" ({r['vs_radix']:.2f}x)" if r["vs_radix"] and be != "radix" else ""
            cells.append(f"{be} {r['median_round_s'] * 1e3:.1f}{vs}")
        print(f"  N={n:3d} history={hist:5d}: " + ", ".join(cells))
    print("  growth exponent in agents x tokens: " + ", ".join(f"{be} {g:.2f}" for be, g in growth.items() if g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
