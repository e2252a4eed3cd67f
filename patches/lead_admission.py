"""Cut a request's prefill at its region so that SGLang's own chunked prefill computes the text before it.

Target: ``sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req`` (AROUND).  When the region the collective
tree offers a request would not fit what is left of the step's chunk and starts after text of the request's own
(:func:`tokendance_sgl.lead_chunk.lead_cut`), the request is admitted without its host hit, with the chunk limit
lowered to the cut: SGLang's admission makes it the step's chunked request, whose first chunk ends at the cut at the
latest. The step admits nothing after it, as after any chunked request. Its region is composed when the chunk
reaches it (``patches/lead_continuation.py``).
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"


def _around_add_one_req(original, self, req, has_chunked_req, *args, **kwargs):
    tree = getattr(self, "tree_cache", None)
    if getattr(tree, "collector", None) is None:
        return original(self, req, has_chunked_req, *args, **kwargs)
    from tokendance_sgl.lead_chunk import lead_cut

    cut = lead_cut(tree, self, req, has_chunked_req)
    if not cut:
        return original(self, req, has_chunked_req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import AddReqResult

    st, room = req.td, self.rem_chunk_tokens
    layout, hit = st.layout, req.host_hit_length
    st.layout, req.host_hit_length, st.lead_cut = None, 0, cut
    limit = min(room, cut - req.prefix_len)
    self.rem_chunk_tokens = limit
    try:
        res = original(self, req, has_chunked_req, *args, **kwargs)
    finally:
        self.rem_chunk_tokens = room - (limit - self.rem_chunk_tokens)
    if self.new_chunked_req is not req:  # not admitted: planned again at its next match
        st.layout, req.host_hit_length, st.lead_cut = layout, hit, 0
        return res
    return AddReqResult.OTHER


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_add_one_req, HookType.AROUND)
