"""Fail a request whose segment table the cache refuses (unknown segment id, content that does not match).

Target: ``sglang.srt.managers.scheduler.Scheduler._add_request_to_queue`` (BEFORE, scheduler process).  The
table's shape was already checked at the door (:mod:`tokendance_sgl.patches.segment_validation`); what needs the
cache's registry is checked here by :meth:`CollectiveTree.validate_request`.  A refused request is finished with
SGLang's own abort (HTTP 400 with the message) and queued, exactly as SGLang treats an over-long prompt; the
scheduler and every other request go on.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"


def _before_add_request_to_queue(self, req, *args, **kwargs):
    from tokendance_sgl.collective_tree import CollectiveTree

    tree = getattr(self, "tree_cache", None)
    if isinstance(tree, CollectiveTree) and not req.finished():
        error = tree.validate_request(req)
        if error:
            req.set_finish_with_abort(f"tokendance: {error}")
    return None


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _before_add_request_to_queue, HookType.BEFORE)
