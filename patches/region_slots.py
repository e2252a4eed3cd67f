"""Reserve the KV slots a composed region takes before SGLang admits the request.

Target: ``sglang.srt.managers.schedule_policy.PrefillAdder._request_slot_reserve_for_req`` (AROUND).
``PrefillAdder.add_one_req`` adds what it returns to the tokens a request needs before it selects the request's
prefill shape (so the request waits when the pool cannot hold them) and charges it to the step's memory budget when
it commits the admission. For a request whose prefix includes a region the collective tree is about to compose
(``req.td.layout``, before ``init_load_back``), the region's private slots -- the diff slots, the text between
segments and the copies' last tokens (:meth:`tokendance_sgl.collective_tree.CollectiveTree.region_slots`) -- are
added. After the composition those slots are allocated (counted by the allocator), so nothing is added twice.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._request_slot_reserve_for_req"


def _around_reserve(original, self, req, *args, **kwargs):
    n = original(self, req, *args, **kwargs)
    tree = getattr(self, "tree_cache", None)
    if getattr(tree, "collector", None) is None:
        return n
    layout = getattr(getattr(req, "td", None), "layout", None)
    if layout is None or layout.start != req.prefix_len or req.host_hit_length != layout.end - layout.start:
        return n  # no region, or composed already
    return n + tree.region_slots(layout)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_reserve, HookType.AROUND)
