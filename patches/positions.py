"""Aligned positions: apply each request's position map to the position ids SGLang computes.

Target: ``sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new`` (AFTER; a classmethod, so the hook
receives ``(result, cls, batch, model_runner, ...)``).  Extend batches hold ``extend_lens[i]`` positions per
request, decode batches one; requests whose map is the identity (``req.td.positions``) are left alone.
"""

from __future__ import annotations

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


def _after_init_new(result, cls, batch, *args, **kwargs):
    positions = getattr(result, "positions", None)
    reqs = getattr(batch, "reqs", None)
    if positions is None or not reqs or not any(getattr(r, "td", None) is not None and r.td.positions for r in reqs):
        return result
    from tokendance_sgl.recompute import shift_positions

    mode = result.forward_mode
    if mode.is_decode():
        lengths = [1] * len(reqs)
    elif mode.is_extend():
        lengths = list(batch.extend_lens)
    else:
        return result
    if sum(lengths) != positions.numel():
        raise RuntimeError(f"tokendance: {positions.numel()} positions for {sum(lengths)} tokens in {mode}")
    shift_positions(positions, reqs, lengths)
    return result


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _after_init_new, HookType.AFTER)
