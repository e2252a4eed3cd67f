"""Kernel benchmarks: K re-rotation, K/V slot copies and selective-recompute attention.

    python benchmarks/kernels.py [--quick] [--peak-bw-gbs 3350] [--out PATH]

Needs only torch and triton (no sglang, no installed tokendance_sgl): the kernels are loaded from the ``kernels/``
directory next to this script. Writes ``benchmarks/results/kernels_<cpu|cuda>.json``.

On a GPU:
  * ``rerotate_k``: achieved bandwidth = bytes / time with bytes = 2 * n * layers * kv_heads * rotary_dim * itemsize
    (each rotated element read once and written once) + 3 * 8 * n (slot, delta indices), as a fraction of the device's
    peak memory bandwidth (``--peak-bw-gbs`` or a table of known devices) and of a plain device-to-device copy
    measured here. Target: >= 60 % of peak on H100. ``copy_kv_slots``/``copy_rerotate_k`` are reported the same way.
  * ``selective_extend_attention`` against torch ``scaled_dot_product_attention`` doing the same work densely: the
    same queries over the same (already gathered, contiguous) keys with a causal mask (``is_causal`` when the queries
    are all rows, an explicit row mask otherwise). Target: at most 1.5x SDPA's time.
  * a small sweep of launch parameters, so that defaults can be tuned from the JSON.
On CPU: times the torch references (small sizes), compiles the Triton kernels for sm_90 without a GPU (registers,
spills, access widths) and records ``"gpu": null`` with a note that the GPU figures are missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Peak DRAM bandwidth in GB/s by device-name substring (first match wins; vendor datasheets).
PEAK_BW_GBS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (HBM3)
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
]

# Model shapes (layers, heads, kv_heads, head_dim): the project's default model and a typical 8B model.
MODELS = {
    "smollm2-135m": (30, 9, 3, 64),
    "llama3-8b": (32, 32, 8, 128),
}


def load_kernels() -> ModuleType:
    """The ``kernels/`` package of this checkout, imported by path (works without installing tokendance_sgl)."""
    init = REPO / "kernels" / "__init__.py"
    if init.is_file():
        name = "tokendance_sgl_kernels_bench"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module("tokendance_sgl.kernels")


def log(msg: str) -> None:
    print(f"[bench-kernels] {msg}", flush=True)


# ---- timing -----------------------------------------------------------------------------------------------------


def time_gpu_ms(fn: Callable[[], Any], *, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in ms (triton's do_bench: warm-up, L2 flushed between runs, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def time_cpu_ms(fn: Callable[[], Any], *, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ---- inputs -----------------------------------------------------------------------------------------------------


def make_pool(layers: int, rows: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Separate per-layer tensors, like SGLang's MHATokenToKVPool."""
    return [torch.randn(rows, kv_heads, dim, dtype=dtype, device=device) for _ in range(layers)]


def rerotate_bytes(n: int, layers: int, kv_heads: int, rotary_dim: int, itemsize: int) -> int:
    return 2 * n * layers * kv_heads * rotary_dim * itemsize + 3 * 8 * n


def copy_bytes(n: int, layers: int, kv_heads: int, k_dim: int, v_dim: int, itemsize: int) -> int:
    return 2 * n * layers * kv_heads * (k_dim + v_dim) * itemsize + 2 * 8 * n


def attention_case(
    batch: int, seq_len: int, frac: float, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str
) -> dict[str, Any]:
    """``batch`` requests of ``seq_len`` tokens in a shuffled pool; queries at a random ``frac`` of each row (all rows
    when frac == 1), in shuffled order. Also the dense per-request K/V for the SDPA baseline."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pool_rows = batch * seq_len + 16
    kb = torch.randn(pool_rows, kv_heads, dim, dtype=dtype, device=device)
    vb = torch.randn(pool_rows, kv_heads, dim, dtype=dtype, device=device)
    perm = torch.randperm(pool_rows, generator=g)
    req_to_token = torch.zeros(batch + 1, seq_len, dtype=torch.int32)
    q_req, q_rows = [], []
    for b in range(batch):
        req_to_token[b + 1] = perm[b * seq_len : (b + 1) * seq_len].to(torch.int32)
        n_q = max(1, int(round(frac * seq_len)))
        rows = torch.arange(seq_len) if n_q == seq_len else torch.randperm(seq_len, generator=g)[:n_q].sort().values
        q_req.append(torch.full((n_q,), b))
        q_rows.append(rows)
    q_req_t, q_rows_t = torch.cat(q_req), torch.cat(q_rows)
    shuffle = torch.randperm(q_req_t.numel(), generator=g)
    q_req_t, q_rows_t = q_req_t[shuffle], q_rows_t[shuffle]
    q = torch.randn(q_req_t.numel(), heads, dim, dtype=dtype, device=device)
    req_to_token = req_to_token.to(device)
    return dict(
        q=q,
        k_buffer=kb,
        v_buffer=vb,
        req_to_token=req_to_token,
        req_pool_indices=torch.arange(1, batch + 1, device=device),
        seq_lens=torch.full((batch,), seq_len, device=device),
        q_req=q_req_t.to(device),
        q_rows=q_rows_t.to(device),
    )


def sdpa_inputs(
    case: dict[str, Any], *, all_rows: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per request: (q [1, H, nq, D], k [1, H, L, D], v, mask or None for is_causal), queries sorted by row, K/V
    gathered and expanded to all query heads beforehand (the strongest dense baseline: flash attention applies).
    ``all_rows``: random queries at every row instead (what recomputing the whole request would cost)."""
    out = []
    heads = case["q"].shape[1]
    group = heads // case["k_buffer"].shape[1]
    for b in range(case["req_pool_indices"].numel()):
        sel = (case["q_req"] == b).nonzero().squeeze(1)
        rows = case["q_rows"][sel]
        rows, order = rows.sort()
        sel = sel[order]
        L = int(case["seq_lens"][b])
        slots = case["req_to_token"][case["req_pool_indices"][b], :L].long()
        k = case["k_buffer"][slots].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        v = case["v_buffer"][slots].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        if all_rows:
            q = torch.randn(1, heads, L, k.shape[-1], dtype=k.dtype, device=k.device)
            out.append((q, k, v, None))
            continue
        q = case["q"][sel].transpose(0, 1).unsqueeze(0).contiguous()
        mask = None
        if rows.numel() != L:
            mask = torch.arange(L, device=rows.device)[None, :] <= rows[:, None]
        out.append((q, k, v, mask))
    return out


def run_sdpa(inputs, scale: float) -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for q, k, v, mask in inputs:
        if mask is None:
            sdpa(q, k, v, is_causal=True, scale=scale)
        else:
            sdpa(q, k, v, attn_mask=mask, scale=scale)


# ---- GPU benchmark ----------------------------------------------------------------------------------------------


def peak_bandwidth(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-bw-gbs"
    for key, bw in PEAK_BW_GBS:
        if key in name:
            return bw, f"table entry {key!r}"
    return None, "unknown device: pass --peak-bw-gbs"


GPU_SIZES = {
    "rerotate_n": [1024, 4096, 16384, 65536],
    "attention": [(1, 4096, 1.0), (4, 2048, 1.0), (8, 1024, 1.0), (4, 4096, 0.15), (16, 2048, 0.15), (4, 8192, 0.3)],
}
GPU_SIZES_QUICK = {"rerotate_n": [4096, 32768], "attention": [(4, 2048, 1.0), (4, 4096, 0.15)]}


def bench_gpu(K: ModuleType, args: argparse.Namespace, *, dev: str = "cuda",
              sizes: dict[str, list] | None = None) -> dict[str, Any]:
    sizes = sizes or (GPU_SIZES_QUICK if args.quick else GPU_SIZES)
    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    peak, peak_src = peak_bandwidth(name, args.peak_bw_gbs)
    dtype = torch.bfloat16
    res: dict[str, Any] = {"device_name": name, "peak_bw_gbs": peak, "peak_bw_source": peak_src}

    big = torch.empty(256 * 2**20 if dev == "cuda" else 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    ms = time_gpu_ms(lambda: dst.copy_(big))
    res["device_copy_bw_gbs"] = round(2 * big.numel() / ms / 1e6, 1)
    del big, dst
    log(f"{name}: peak {peak} GB/s ({peak_src}), measured device copy {res['device_copy_bw_gbs']} GB/s")

    def bw_entry(nbytes: int, ms_: float) -> dict[str, Any]:
        gbs = nbytes / ms_ / 1e6
        return {
            "ms": round(ms_, 4),
            "bytes": nbytes,
            "gb_per_s": round(gbs, 1),
            "fraction_of_peak": round(gbs / peak, 3) if peak else None,
            "fraction_of_device_copy": round(gbs / res["device_copy_bw_gbs"], 3),
        }

    rot_cases = []
    for model, (layers, _, kv_heads, dim) in MODELS.items():
        for n in sizes["rerotate_n"]:
            rows = 2 * n
            ks = make_pool(layers, rows, kv_heads, dim, dtype, dev)
            vs = make_pool(layers, rows, kv_heads, dim, dtype, dev)
            perm = torch.randperm(rows, device=dev)
            slots, dsts = perm[:n], perm[n:]
            delta = torch.randint(-4096, 4096, (n,), device=dev)
            kw = dict(rope_theta=1e5, rotary_dim=dim)
            # correctness against the reference on a copy of layer 0..1
            chk = [b[: min(rows, 4096)].clone() for b in ks[:2]]
            chk_ref = [b.clone() for b in chk]
            cs = torch.randperm(chk[0].shape[0], device=dev)[:512]
            cd = torch.randint(-4096, 4096, (cs.numel(),), device=dev)
            K.rerotate_k_triton(chk, cs, cd, **kw)
            K.rerotate_k_ref(chk_ref, cs, cd, **kw)
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(chk, chk_ref))

            entry: dict[str, Any] = {"model": model, "n": n, "layers": layers, "kv_heads": kv_heads, "head_dim": dim,
                                     "rotary_dim": dim, "dtype": str(dtype), "max_abs_err_vs_ref": err}
            nbytes = rerotate_bytes(n, layers, kv_heads, dim, ks[0].element_size())
            entry["rerotate_k"] = bw_entry(nbytes, time_gpu_ms(lambda: K.rerotate_k_triton(ks, slots, delta, **kw)))
            sweep = {}
            for block_n in (16, 32, 64):
                for lpp in (None, 1, 4, layers):
                    key = f"block_n={block_n},layers_per_prog={lpp or 'auto'}"
                    sweep[key] = round(time_gpu_ms(lambda: K.rerotate_k_triton(
                        ks, slots, delta, block_n=block_n, layers_per_prog=lpp, **kw), rep_ms=40), 4)
            best = min(sweep, key=sweep.get)
            entry["rerotate_k_sweep_ms"] = sweep
            entry["rerotate_k_best"] = {"config": best, **bw_entry(nbytes, sweep[best])}
            entry["rerotate_k_torch_ref"] = bw_entry(nbytes, time_gpu_ms(lambda: K.rerotate_k_ref(ks, slots, delta, **kw),
                                                                         rep_ms=50))
            cb = copy_bytes(n, layers, kv_heads, dim, dim, ks[0].element_size())
            entry["copy_kv_slots"] = bw_entry(cb, time_gpu_ms(lambda: K.copy_kv_slots_triton(ks, vs, slots, dsts)))
            entry["copy_rerotate_k"] = bw_entry(
                cb, time_gpu_ms(lambda: K.copy_rerotate_k_triton(ks, vs, slots, dsts, delta, **kw)))
            rot_cases.append(entry)
            log(f"rerotate_k {model} n={n}: {entry['rerotate_k']['gb_per_s']} GB/s "
                f"({entry['rerotate_k']['fraction_of_peak']} of peak; best {best}: "
                f"{entry['rerotate_k_best']['fraction_of_peak']}); copy_kv_slots {entry['copy_kv_slots']['gb_per_s']}")
            del ks, vs
            if dev == "cuda":
                torch.cuda.empty_cache()
    res["rerotate_k"] = rot_cases

    att_cases = []
    for model, (_, heads, kv_heads, dim) in MODELS.items():
        for batch, seq_len, frac in sizes["attention"]:
            case = attention_case(batch, seq_len, frac, heads, kv_heads, dim, dtype, dev)
            scale = dim**-0.5
            n_q = case["q"].shape[0]
            plan_cfg = K._triton_module("selective_attention").default_config(dim, dtype, torch.device(dev))
            plan = K.plan_selective_attention(case["q_req"], case["q_rows"], batch, block_m=plan_cfg["block_m"])
            out = K.selective_extend_attention_triton(**case, sm_scale=scale, plan=plan)
            ref = K.selective_extend_attention_ref(**case, sm_scale=scale)
            err = (out.float() - ref.float()).abs().max().item()
            inputs = sdpa_inputs(case)
            t_sdpa = time_gpu_ms(lambda: run_sdpa(inputs, scale))
            t_sdpa_all = None
            if frac < 1.0:
                dense = sdpa_inputs(case, all_rows=True)
                t_sdpa_all = time_gpu_ms(lambda: run_sdpa(dense, scale))
                del dense
            t_plan = time_gpu_ms(lambda: K.selective_extend_attention_triton(**case, sm_scale=scale, plan=plan))
            t_full = time_gpu_ms(lambda: K.selective_extend_attention_triton(**case, sm_scale=scale))
            sweep = {}
            for bm, bn, nw, ns_ in [(64, 64, 4, 1), (128, 64, 4, 1), (128, 64, 8, 1), (128, 32, 4, 2), (64, 64, 4, 2),
                                    (128, 128, 8, 1), (64, 32, 4, 3)]:
                key = f"block_m={bm},block_n={bn},warps={nw},stages={ns_}"
                try:
                    p = K.plan_selective_attention(case["q_req"], case["q_rows"], batch, block_m=bm)
                    sweep[key] = round(time_gpu_ms(lambda: K.selective_extend_attention_triton(
                        **case, sm_scale=scale, plan=p, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns_),
                        rep_ms=40), 4)
                except Exception as e:  # e.g. out of shared memory for a config
                    sweep[key] = f"failed: {type(e).__name__}"
            timed = {k: v for k, v in sweep.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            flops = 4 * heads * dim * sum(int(r) + 1 for r in case["q_rows"].tolist())  # QK^T and PV over visible keys
            entry = {
                "model": model, "batch": batch, "seq_len": seq_len, "query_fraction": frac, "n_q": n_q,
                "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "dtype": str(dtype),
                "max_abs_err_vs_ref": err,
                "sdpa_ms": round(t_sdpa, 4),
                "sdpa_mode": "is_causal" if frac == 1.0 else "boolean row mask",
                "sdpa_all_rows_causal_ms": round(t_sdpa_all, 4) if t_sdpa_all is not None else None,
                "triton_ms_with_plan": round(t_plan, 4),
                "triton_ms_including_plan": round(t_full, 4),
                "ratio_to_sdpa": round(t_plan / t_sdpa, 3),
                "ratio_to_sdpa_including_plan": round(t_full / t_sdpa, 3),
                "triton_tflops": round(flops / t_plan / 1e9, 1),
                "sweep_ms": sweep,
                "best": {"config": best, "ms": timed.get(best), "ratio_to_sdpa": round(timed[best] / t_sdpa, 3)}
                if best else None,
            }
            att_cases.append(entry)
            log(f"attention {model} b={batch} L={seq_len} frac={frac}: triton {t_plan:.3f} ms vs SDPA {t_sdpa:.3f} ms "
                f"(x{entry['ratio_to_sdpa']}; best {best}: x{entry['best'] and entry['best']['ratio_to_sdpa']}), "
                f"err {err:.2e}")
            del case, inputs
            if dev == "cuda":
                torch.cuda.empty_cache()
    res["selective_extend_attention"] = att_cases

    fr = [c["rerotate_k"]["fraction_of_peak"] for c in rot_cases if c["rerotate_k"]["fraction_of_peak"] is not None]
    big_fr = [c["rerotate_k"]["fraction_of_peak"] for c in rot_cases
              if c["rerotate_k"]["fraction_of_peak"] is not None and c["n"] >= 16384]
    ratios = [c["ratio_to_sdpa"] for c in att_cases]
    res["summary"] = {
        "rerotate_k_fraction_of_peak_min": min(fr) if fr else None,
        "rerotate_k_fraction_of_peak_max": max(fr) if fr else None,
        "rerotate_k_target_0.6_met_for_n>=16384": (min(big_fr) >= 0.6) if big_fr else None,
        "attention_ratio_to_sdpa_max": max(ratios) if ratios else None,
        "attention_target_1.5x_met": (max(ratios) <= 1.5) if ratios else None,
    }
    return res


# ---- CPU benchmark ----------------------------------------------------------------------------------------------


def bench_cpu(K: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg())}
    rot = []
    ns = [256] if args.quick else [256, 1024, 4096]
    layers, _, kv_heads, dim = MODELS["smollm2-135m"]
    for dtype in (torch.float32, torch.bfloat16):
        for n in ns:
            ks = make_pool(layers, 2 * n, kv_heads, dim, dtype, "cpu")
            vs = make_pool(layers, 2 * n, kv_heads, dim, dtype, "cpu")
            perm = torch.randperm(2 * n)
            slots, dsts = perm[:n], perm[n:]
            delta = torch.randint(-4096, 4096, (n,))
            kw = dict(rope_theta=1e5, rotary_dim=dim)
            ms = time_cpu_ms(lambda: K.rerotate_k_ref(ks, slots, delta, **kw))
            nbytes = rerotate_bytes(n, layers, kv_heads, dim, ks[0].element_size())
            cms = time_cpu_ms(lambda: K.copy_kv_slots_ref(ks, vs, slots, dsts))
            crms = time_cpu_ms(lambda: K.copy_rerotate_k_ref(ks, vs, slots, dsts, delta, **kw))
            rot.append({"model": "smollm2-135m", "n": n, "dtype": str(dtype), "rerotate_k_ref_ms": round(ms, 3),
                        "rerotate_k_ref_gb_per_s": round(nbytes / ms / 1e6, 2),
                        "copy_kv_slots_ref_ms": round(cms, 3), "copy_rerotate_k_ref_ms": round(crms, 3)})
            log(f"cpu rerotate_k_ref n={n} {dtype}: {ms:.2f} ms; copy_kv_slots_ref {cms:.2f} ms; "
                f"copy_rerotate_k_ref {crms:.2f} ms")
    res["rerotate_and_copy_references"] = rot

    att = []
    _, heads, kv_heads, dim = MODELS["smollm2-135m"]
    for batch, seq_len, frac in ([(1, 512, 1.0)] if args.quick else [(1, 512, 1.0), (2, 1024, 1.0), (2, 2048, 0.15)]):
        case = attention_case(batch, seq_len, frac, heads, kv_heads, dim, torch.float32, "cpu")
        scale = dim**-0.5
        ms = time_cpu_ms(lambda: K.selective_extend_attention_ref(**case, sm_scale=scale), reps=3)
        inputs = sdpa_inputs(case)
        sms = time_cpu_ms(lambda: run_sdpa(inputs, scale), reps=3)
        att.append({"batch": batch, "seq_len": seq_len, "query_fraction": frac, "n_q": case["q"].shape[0],
                    "reference_ms": round(ms, 3), "sdpa_ms": round(sms, 3)})
        log(f"cpu attention ref b={batch} L={seq_len} frac={frac}: {ms:.2f} ms (SDPA {sms:.2f} ms)")
    res["selective_extend_attention_reference"] = att
    return res


def aot_report(K: ModuleType) -> list[dict[str, Any]] | str:
    """sm_90 compile statistics of the real launch specs (no GPU needed)."""
    try:
        aot = K._triton_module("aot")
        rope, kv_copy, sa = (K._triton_module(m) for m in ("rope", "kv_copy", "selective_attention"))
    except Exception as e:  # pragma: no cover
        return f"unavailable: {type(e).__name__}: {e}"
    reports = []
    idx = torch.arange(64)
    for model, (layers, heads, kv_heads, dim) in MODELS.items():
        kb = torch.empty(4, 256, kv_heads, dim, dtype=torch.bfloat16)
        vb = torch.empty_like(kb)
        specs = [("rerotate_k neox", rope.rerotate_spec(kb, idx, idx, idx, rope_theta=1e5, rotary_dim=dim)),
                 ("rerotate_k gptj", rope.rerotate_spec(kb, idx, idx, idx, rope_theta=1e5, rotary_dim=dim,
                                                        is_neox=False)),
                 ("copy_kv_slots", kv_copy.copy_kv_spec(kb, vb, idx, idx + 64))]
        q = torch.empty(64, heads, dim, dtype=torch.bfloat16)
        cfg = {"block_m": 128, "block_n": 64, "num_warps": 8 if dim > 64 else 4, "num_stages": 1}
        specs.append((f"selective_extend_attention {cfg}", sa.selective_attention_spec(
            q, kb[0], vb[0], torch.zeros(2, 256, dtype=torch.int32), torch.arange(1), torch.tensor([64]),
            torch.zeros(64, dtype=torch.long), idx, torch.empty_like(q), sm_scale=0.125, **cfg)))
        for label, spec in specs:
            try:
                r = aot.compile_spec(spec, arch=90)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"}
            reports.append({"model": model, "case": label, **r})
            log(f"sm_90 compile {model} {label}: {r}")
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--peak-bw-gbs", type=float, default=None, help="device peak memory bandwidth in GB/s")
    ap.add_argument("--cpu", action="store_true", help="CPU references even when a GPU is present")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the CPU references (default 1: OpenMP spin-waiting makes multi-thread "
                         "timings erratic on a loaded small machine)")
    ap.add_argument("--no-aot", action="store_true", help="skip the sm_90 compile report on CPU")
    ap.add_argument("--out", type=Path, default=None, help="output JSON path")
    args = ap.parse_args(argv)

    K = load_kernels()
    import triton

    use_gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if use_gpu else "cpu"
    out_path = args.out or RESULTS / f"kernels_{device}.json"
    result: dict[str, Any] = {
        "benchmark": "tokendance-sgl kernels",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if use_gpu else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "formulas": {
            "rerotate_k_bytes": "2 * n * layers * kv_heads * rotary_dim * itemsize + 3 * 8 * n",
            "copy_bytes": "2 * n * layers * kv_heads * (head_dim + v_head_dim) * itemsize + 2 * 8 * n",
            "bandwidth": "bytes / median time (triton.testing.do_bench, L2 flushed)",
            "attention_baseline": "torch SDPA per request on K/V gathered, expanded to all heads and made contiguous "
                                  "beforehand (not timed), same queries, causal mask (is_causal when all rows are "
                                  "queries, boolean row mask otherwise); sdpa_all_rows_causal_ms: SDPA is_causal "
                                  "over every row of the requests (the cost of recomputing everything)",
            "attention_flops": "4 * heads * head_dim * sum over queries of (q_row + 1)",
        },
    }
    t0 = time.time()
    if use_gpu:
        log(f"GPU run on {result['device']}")
        result["gpu"] = bench_gpu(K, args)
        result["cpu_reference"] = None
    else:
        log("no CUDA device: timing the torch references; GPU figures will be missing")
        result["gpu"] = None
        result["note"] = ("GPU figures missing: no CUDA device on this machine. Run `python benchmarks/kernels.py` on a "
                          "GPU host (needs only torch and triton) to measure rerotate_k bandwidth against peak and "
                          "selective_extend_attention against torch SDPA.")
        result["cpu_reference"] = bench_cpu(K, args)
        if not args.no_aot:
            result["sm90_compile"] = aot_report(K)
    result["wall_s"] = round(time.time() - t0, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
