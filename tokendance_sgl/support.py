"""Which SGLang configurations segment reuse supports: everything else is refused at start-up, naming the flag.

The reuse backends (``--kv-backend tokendance`` and ``pic``) compose rows from re-rotated masters, run a replay
forward inside rows and shift positions. Modes that would bypass one of those, or make it wrong, are refused before
anything starts (``patches/kv_backend.py``, main process) and again when the cache is built in the scheduler, where
the server arguments are final (``backend.build_collective_tree``):

===============================  ==========================================================================
refused                          why
===============================  ==========================================================================
speculative decoding             draft / verify batches bypass the row plans and the position map
two-batch / single-batch overlap the split batches bypass the replay forward's attention override
hybrid attention backends        a prefill backend other than the decode one bypasses that override too
fp8 KV cache                     re-rotation would rotate raw fp8 bytes and drop their scales
DP attention, PP > 1             the replay forward runs without the other ranks
TP > 1 with ``deviation``        each rank would score only its own KV heads and choose other positions
PD disaggregation, diffusion LMs their KV transfers and row writes bypass the host's copy of the slots
beam search (per request)        its member rows are written and freed outside it (refused as HTTP 400)
MLA and sliding-window models    no per-layer K/V pool to re-rotate / the window drops reused KV
===============================  ==========================================================================

On a CUDA host the overlap scheduler and the prefill CUDA graph are turned off (:func:`gpu_defaults`): the
collective step launches the master copies from the scheduler, which must be ordered with the forward, and the
pre-pass is an extra forward that a captured prefill graph would not contain. Without overlap (and with PP 1, which
is required) SGLang 0.5.23 runs the forward on the scheduler's own stream (``Scheduler.run_batch``; the forward
stream is the schedule stream then), so the copy kernels launched from ``calc_priority`` and the probe and replay
forwards launched from ``forward_batch_generation`` are stream-ordered with the forwards that read their slots. Decode CUDA graphs stay on: the
position shift is written into ``ForwardBatch.positions`` before the graph runner copies them in.
"""

from __future__ import annotations

from typing import Any

from tokendance_sgl.selection import RecomputePolicy

__all__ = ["refusals", "model_refusals", "gpu_defaults"]


def _get(args: Any, name: str, default: Any = None) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v


def refusals(args: Any, backend: str, policy: RecomputePolicy) -> list[str]:
    """Messages for every server argument of ``args`` that ``--kv-backend backend`` cannot serve (empty: fine)."""
    out = []
    why = f"is not supported with --kv-backend {backend}"
    if _get(args, "speculative_algorithm"):
        out.append(f"--speculative-algorithm {args.speculative_algorithm}: speculative decoding {why}")
    for flag, name in (("--enable-two-batch-overlap", "enable_two_batch_overlap"),
                       ("--enable-single-batch-overlap", "enable_single_batch_overlap")):
        if _get(args, name, False):
            out.append(f"{flag}: batch overlap {why}")
    main = _get(args, "attention_backend")
    for flag, name in (("--prefill-attention-backend", "prefill_attention_backend"),
                       ("--decode-attention-backend", "decode_attention_backend")):
        other = _get(args, name)
        if other and other != main:
            out.append(f"{flag} {other}: hybrid attention {why} (use one --attention-backend)")
    kv_dtype = str(_get(args, "kv_cache_dtype", "auto"))
    if kv_dtype.startswith("fp8") or kv_dtype.startswith("fp4"):
        out.append(f"--kv-cache-dtype {kv_dtype}: a quantized KV cache {why}")
    if _get(args, "enable_dp_attention", False) or int(_get(args, "attn_dp_size", 1)) > 1:
        out.append(f"--enable-dp-attention / --attn-dp-size: DP attention {why}")
    if int(_get(args, "pp_size", 1)) > 1:
        out.append(f"--pp-size {args.pp_size}: pipeline parallelism {why}")
    if str(_get(args, "disaggregation_mode", "null")) != "null":
        out.append(f"--disaggregation-mode {args.disaggregation_mode}: PD disaggregation {why}")
    if _get(args, "dllm_algorithm"):
        out.append(f"--dllm-algorithm {args.dllm_algorithm}: diffusion language models {why}")
    if int(_get(args, "tp_size", 1)) > 1 and policy.needs_scores:
        out.append(f"--tp-size {args.tp_size} with --td-recompute {policy}: deviation selection needs tp-size 1 "
                   f"(each rank would score its own KV heads); use sink:K")
    return out


def model_refusals(hf_config: Any, model: str = "this model") -> list[str]:
    """Messages for model properties segment reuse cannot serve (``hf_config``: a transformers config)."""
    out = []
    if getattr(hf_config, "kv_lora_rank", None) or getattr(hf_config, "q_lora_rank", None):
        out.append(f"{model}: MLA attention (kv_lora_rank) has no per-head K pool to re-rotate")
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        out.append(f"{model}: sliding-window attention (sliding_window={window}) drops reused KV outside its window")
    return out


def gpu_defaults(args: Any) -> list[str]:
    """On a CUDA server: turns the overlap scheduler and the prefill CUDA graph off; returns what it changed."""
    changed = []
    if str(_get(args, "device", "cuda")) not in ("cuda", "auto"):
        return changed
    if not _get(args, "disable_overlap_schedule", False):
        args.disable_overlap_schedule = True
        changed.append("--disable-overlap-schedule (the master copies must be ordered with the forward)")
    if _get(args, "cuda_graph_backend_prefill", None) != "disabled":
        args.cuda_graph_backend_prefill = "disabled"
        changed.append("--cuda-graph-backend-prefill disabled (the pre-pass is a forward the graph does not hold)")
    return changed
