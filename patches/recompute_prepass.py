"""Run the selective-recompute pre-pass before an extend forward.

Target: ``sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation`` (AROUND).  When the batch is an
extend whose requests carry pending recompute spans (``req.td.row_plan``), the cache's KV collector resolves the
round's selections and one extra forward computes them into the requests' own slots
(:meth:`tokendance_sgl.collector.KVCollector.run_prepass`), then the normal extend runs.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"


def _around_forward_batch_generation(original, self, batch=None, *args, **kwargs):
    if batch is not None:
        from tokendance_sgl.collector import run_prepass

        run_prepass(self, batch, lambda tree: getattr(tree, "collector", None))
    return original(self, batch, *args, **kwargs)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_forward_batch_generation, HookType.AROUND)
