"""Compose a request's region when SGLang's chunked prefill has computed the text before it.

Target: ``sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req`` (AROUND).  For the chunked request
whose prefill was cut at its region (``req.td.lead_cut``, ``patches/lead_admission.py``): while its prefix is short
of the cut, each chunk ends at the cut at the latest; once it is there, the region is composed
(:func:`tokendance_sgl.lead_chunk.compose_after_lead`) and its pre-pass is charged to the step's chunk before SGLang
sizes the chunk that follows the region. As with an admission's pre-pass, the step's first request is charged all
but one token of the chunk at most. A chunk that leaves the request unfinished ends the step's admissions, as a
truncated chunk always does (SGLang tracks one chunked request at a time).
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"


def _around_add_chunked_req(original, self, req, *args, **kwargs):
    st = getattr(req, "td", None)
    cut = st.lead_cut if st is not None else 0
    if not cut or self.rem_chunk_tokens is None:
        return original(self, req, *args, **kwargs)
    limit = self.chunked_req_limit
    prepass = 0
    if req.prefix_len < cut:  # the lead goes on
        cap = cut - req.prefix_len
    else:
        from tokendance_sgl.lead_chunk import compose_after_lead

        st.lead_cut = 0
        prepass = min(compose_after_lead(self.tree_cache, req), max(0, self.rem_chunk_tokens - 1))
        cap = max(1, self.rem_chunk_tokens - prepass)
    self.chunked_req_limit = cap if limit is None else min(cap, limit)
    try:
        out = original(self, req, *args, **kwargs)
    finally:
        self.chunked_req_limit = limit
    if self.can_run_list and self.can_run_list[-1] is req:
        if prepass:  # the region's pre-pass runs in this step
            self.rem_input_tokens -= prepass
            self.rem_chunk_tokens -= prepass
        if out is req:  # still chunked: as after any truncated chunk, the step admits no other request (SGLang
            self.rem_chunk_tokens = min(self.rem_chunk_tokens, 0)  # tracks one chunked request at a time)
    return out


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_add_chunked_req, HookType.AROUND)
