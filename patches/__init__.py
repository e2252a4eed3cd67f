"""SGLang hooks of tokendance-sgl, one small module per hook target (each names its target)."""

from __future__ import annotations


def register_all() -> None:
    import multiprocessing

    from tokendance_sgl.patches import kv_backend, stats

    main_process = multiprocessing.parent_process() is None
    kv_backend.register_hooks()
    kv_backend.register_cache_backends()
    stats.register_hooks(main_process)
    if main_process:
        # TokenizerManager and the HTTP server live in the main process.
        from tokendance_sgl.patches import segment_validation

        segment_validation.register_hooks()
    else:
        # Scheduler (and detokenizer) processes. The forward hooks act only on requests carrying a row plan.
        from tokendance_sgl.patches import (collective_round, cpu_extend_attention, lead_admission,
                                            lead_continuation, metrics, positions, prepass_budget,
                                            recompute_prepass, row_mirror, segment_admission)

        segment_admission.register_hooks()
        prepass_budget.register_hooks()
        lead_admission.register_hooks()
        lead_continuation.register_hooks()
        metrics.register_hooks()
        collective_round.register_hooks()
        recompute_prepass.register_hooks()
        positions.register_hooks()
        row_mirror.register_hooks()
        cpu_extend_attention.register_hooks()
