"""SGLang hooks of tokendance-sgl, one small module per hook target (each names its target)."""

from __future__ import annotations


def register_all() -> None:
    from tokendance_sgl.patches import kv_backend

    kv_backend.register_hooks()
