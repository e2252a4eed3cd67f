"""Reject a malformed segment table (or ``td_recompute`` policy) at the door: HTTP 400 for that request alone.

Target: ``sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request`` (AFTER), which the
TokenizerManager (main process) calls for every generate request once its input ids are known.  A ValueError
raised there becomes an HTTP 400 with the message; nothing reaches the scheduler.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"


def validate_request(obj, input_ids) -> None:
    from tokendance_sgl.segments import parse_segment_table

    sampling = getattr(obj, "sampling_params", None)
    if not isinstance(sampling, dict):
        return
    cp = sampling.get("custom_params")
    parse_segment_table(cp, len(input_ids) if input_ids is not None else None)
    if isinstance(cp, dict) and cp.get("td_recompute") is not None:
        from tokendance_sgl.selection import parse_policy

        parse_policy(cp["td_recompute"])  # ValueError -> HTTP 400


def _after_validate_one_request(result, self, obj, input_ids, *args, **kwargs):
    validate_request(obj, input_ids)
    return result


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _after_validate_one_request, HookType.AFTER)
