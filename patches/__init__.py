"""SGLang hooks of tokendance-sgl, one small module per hook target (each names its target)."""

from __future__ import annotations


def register_all() -> None:
    import multiprocessing

    from tokendance_sgl.patches import kv_backend

    kv_backend.register_hooks()
    if multiprocessing.parent_process() is None:
        # Main process only (TokenizerManager and the HTTP server live there).
        from tokendance_sgl.patches import segment_validation

        segment_validation.register_hooks()
