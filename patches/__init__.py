"""SGLang hooks of tokendance-sgl, one small module per hook target (each names its target)."""

from __future__ import annotations


def register_all() -> None:
    import multiprocessing

    from tokendance_sgl.patches import kv_backend, stats

    main_process = multiprocessing.parent_process() is None
    kv_backend.register_hooks()
    stats.register_hooks(main_process)
    if main_process:
        # Main process only (TokenizerManager and the HTTP server live there).
        from tokendance_sgl.patches import segment_validation

        segment_validation.register_hooks()
