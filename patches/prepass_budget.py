"""Charge the pre-pass to SGLang's prefill budget, as the rows a step recomputes.

Target: ``sglang.srt.managers.schedule_policy.PrefillAdder._replay_len`` (AROUND).  SGLang asks it, when it
selects a request's prefill shape, for the cached rows the step will recompute besides the extend (encoder replay);
``PrefillAdder`` then takes them from the chunk (``rem_chunk_tokens``) and the step's input budget. For a request
whose prefix includes a region the collective tree is about to compose (``req.td.layout``), the region's pre-pass
(:func:`tokendance_sgl.reuse.prepass_tokens`) is added. A pre-pass larger than what is left of the chunk waits for
the next step, unless the request is the step's first, which is then charged all but one token of the chunk (its
pre-pass runs in forwards of at most ``--chunked-prefill-size`` tokens).
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._replay_len"


def _around_replay_len(original, self, req, prefix_len, *args, **kwargs):
    n = original(self, req, prefix_len, *args, **kwargs)
    if getattr(getattr(self, "tree_cache", None), "collector", None) is None:
        return n
    layout = getattr(getattr(req, "td", None), "layout", None)
    if layout is None or layout.end != prefix_len or layout.start != req.prefix_len:
        return n  # not the admission that composes the region
    from tokendance_sgl.reuse import prepass_tokens

    extra = prepass_tokens(layout)
    room = self.rem_chunk_tokens
    if room is not None and n + extra >= room and not self.can_run_list:
        extra = max(0, room - 1 - n)
    return n + extra


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_replay_len, HookType.AROUND)
