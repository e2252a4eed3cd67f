"""Run the selective-recompute pre-pass before an extend forward.

Target: ``sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation`` (AROUND).  When the batch is an
extend whose requests carry pending recompute spans (``req.td_row_plan``), one extra forward computes them into the
requests' own slots (:func:`tokendance_sgl.recompute.run_prepass`), then the normal extend runs.
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"


def _around_forward_batch_generation(original, self, batch=None, *args, **kwargs):
    if batch is not None:
        from tokendance_sgl.recompute import run_prepass

        run_prepass(self, batch)
    return original(self, batch, *args, **kwargs)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_forward_batch_generation, HookType.AROUND)
