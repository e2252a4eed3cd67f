"""`tokendance_sgl.Engine`: SGLang's offline `Engine` with the `kv_backend` keyword and CPU defaults."""

from __future__ import annotations

import functools

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang is imported)
from tokendance_sgl import _bootstrap
from tokendance_sgl.patches.kv_backend import KVBackendError, TokenDanceSettings, apply_to_server_args

# Engine keyword equivalents of server.CPU_DEFAULTS.
CPU_ENGINE_DEFAULTS = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "dtype": "float32",
    "max_total_tokens": 16384,
    "disable_overlap_schedule": True,
    "sleep_on_idle": True,
}


def _build_server_args(settings: TokenDanceSettings | None, **kwargs):
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(**kwargs)
    if settings is not None:
        apply_to_server_args(server_args, settings)
    return server_args


def engine_kwargs(
    kv_backend: str | None, kwargs: dict, td_recompute: str | None = None, td_max_gap: int | None = None
) -> tuple[TokenDanceSettings | None, dict]:
    out = dict(kwargs)
    if not _bootstrap.host_has_cuda():
        for key, value in CPU_ENGINE_DEFAULTS.items():
            out.setdefault(key, value)
    if kv_backend is None and (td_recompute is not None or td_max_gap is not None):
        raise KVBackendError("td_recompute and td_max_gap need kv_backend='tokendance'")
    settings = (
        TokenDanceSettings(kv_backend=kv_backend, recompute=td_recompute, max_gap=td_max_gap)
        if kv_backend is not None
        else None
    )
    return settings, out


def _engine_class():
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    class Engine(SGLangEngine):
        """``Engine(model_path=..., kv_backend="radix" | "pic" | "tokendance", td_recompute=None, td_max_gap=None,
        **sglang_server_args)``."""

        def __init__(self, *, kv_backend: str | None = "radix", td_recompute: str | None = None,
                     td_max_gap: int | None = None, **kwargs):
            settings, kwargs = engine_kwargs(kv_backend, kwargs, td_recompute, td_max_gap)
            if settings is not None:
                # Fail before any process starts, with the same message as the command line.
                from tokendance_sgl.patches.kv_backend import resolve_backend

                resolve_backend(
                    settings,
                    radix_cache_backend=kwargs.get("radix_cache_backend"),
                    disable_radix_cache=bool(kwargs.get("disable_radix_cache", False)),
                )
            self.server_args_class = functools.partial(_build_server_args, settings)
            super().__init__(**kwargs)

    return Engine


def __getattr__(name: str):
    if name == "Engine":
        cls = _engine_class()
        globals()["Engine"] = cls
        return cls
    raise AttributeError(name)


__all__ = ["Engine", "KVBackendError", "engine_kwargs"]
