"""The host copy of ``req_to_token`` follows SGLang's own row writes (:mod:`tokendance_sgl.slot_mirror`).

Targets (each acts only on a request pool a collective tree attached its row mirror to):
  * ``sglang.srt.mem_cache.allocation.write_cache_indices`` (AFTER): an extend wrote each row's prefix and new slots.
  * ``sglang.srt.managers.schedule_batch.alloc_for_extend`` (AROUND; ScheduleBatch imports it by name) and
    ``sglang.srt.mem_cache.allocation.alloc_for_decode_default`` (AROUND): while
    a batch allocates, the paged allocator finds each row's last slot in the mirror; after a decode step's
    allocation, the slot it wrote at each row's end is noted.
  * ``sglang.srt.mem_cache.allocation._prefix_kv_indices`` (AFTER): a later chunk's prefix is its own row's, read
    from the mirror (remembered, so the extend's write needs no device read).
  * ``...scheduler_components.invariant_checker.SchedulerInvariantChecker.self_check_during_busy`` (AFTER): with
    ``TOKENDANCE_CHECK_SLOTS=1`` (the engine tests), the host's slots are compared with the device's at every busy
    memory check (``CollectiveTree.check_slots``).
"""

from __future__ import annotations

PREFIX = "sglang.srt.mem_cache.allocation."
EXTEND_TARGET = "sglang.srt.managers.schedule_batch.alloc_for_extend"  # (its caller's binding: imported by name)
CHECK_TARGET = "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker.self_check_during_busy"
ENV_CHECK = "TOKENDANCE_CHECK_SLOTS"  # (tests) compare the host's slots with the device's at every busy check


def _after_write_cache_indices(result, out_cache_loc, req_pool_indices_tensor, req_pool_indices_cpu,
                               prefix_lens_tensor, prefix_lens_cpu, seq_lens_tensor, seq_lens_cpu, extend_lens_tensor,
                               extend_lens_cpu, prefix_tensors, req_to_token_pool):
    from tokendance_sgl.slot_mirror import note_extend, row_mirror_of

    rows = row_mirror_of(req_to_token_pool)
    if rows is not None:
        note_extend(rows, out_cache_loc, req_pool_indices_cpu, prefix_lens_cpu, extend_lens_cpu, prefix_tensors)
    return result


def _around_alloc_for_extend(original, batch, *args, **kwargs):
    from tokendance_sgl.slot_mirror import allocating, allocating_batch

    token = allocating.set(allocating_batch(batch))
    try:
        return original(batch, *args, **kwargs)
    finally:
        allocating.reset(token)


def _around_alloc_for_decode(original, batch, token_per_req, *args, **kwargs):
    from tokendance_sgl.slot_mirror import allocating, allocating_batch, note_decode, row_mirror_of

    rows = row_mirror_of(batch.req_to_token_pool)
    if rows is None:
        return original(batch, token_per_req, *args, **kwargs)
    token = allocating.set(allocating_batch(batch))
    try:
        out = original(batch, token_per_req, *args, **kwargs)
    finally:
        allocating.reset(token)
    note_decode(rows, out, batch, token_per_req)
    return out


def _after_prefix_kv_indices(result, batch, req):
    from tokendance_sgl.slot_mirror import remember_own_prefix

    remember_own_prefix(batch.req_to_token_pool, req, result)
    return result


def _after_busy_check(result, checker, *args, **kwargs):
    import os

    tree = getattr(checker, "tree_cache", None)
    if os.environ.get(ENV_CHECK) == "1" and getattr(tree, "row_mirror", None) is not None:
        tree.check_slots()
    return result


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(PREFIX + "write_cache_indices", _after_write_cache_indices, HookType.AFTER)
    HookRegistry.register(EXTEND_TARGET, _around_alloc_for_extend, HookType.AROUND)
    HookRegistry.register(PREFIX + "alloc_for_decode_default", _around_alloc_for_decode, HookType.AROUND)
    HookRegistry.register(PREFIX + "_prefix_kv_indices", _after_prefix_kv_indices, HookType.AFTER)
    HookRegistry.register(CHECK_TARGET, _after_busy_check, HookType.AFTER)
