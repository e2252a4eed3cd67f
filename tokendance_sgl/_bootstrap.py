"""Process bootstrap for running the unmodified SGLang engine on a host without CUDA.

This module must stay cheap and must not import torch or sglang: it runs in every Python process of the
environment through the `tokendance_sgl_cpu.pth` file the package installs (that is how it reaches the
scheduler and detokenizer processes SGLang spawns, which import sglang before any plugin runs), and on
`import tokendance_sgl`.

On a host with no NVIDIA driver it
  * sets ``SGLANG_USE_CPU_ENGINE=1`` (SGLang reads it when its modules are imported), and
  * installs an import hook for ``sgl_kernel``: the real module is tried first; only if it fails to import
    (the PyPI ``sglang-kernel`` wheel is CUDA-only) is the module replaced by
    :mod:`tokendance_sgl.sgl_kernel_fallback`, torch implementations of the few CPU ops SGLang calls.
On a CUDA host it does nothing.  ``TOKENDANCE_CPU=1`` / ``TOKENDANCE_CPU=0`` force the decision.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

_FALLBACK_MODULE = "tokendance_sgl.sgl_kernel_fallback"


def host_has_cuda() -> bool:
    forced = os.environ.get("TOKENDANCE_CPU")
    if forced is not None:
        return forced.strip().lower() in ("0", "false", "no", "")
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/nvidia0"))


class _FallbackLoader(importlib.abc.Loader):
    """Runs the real loader; if that raises, turns the half-initialised module into the torch fallback."""

    def __init__(self, real_loader):
        self.real_loader = real_loader

    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        error: BaseException | None = None
        if self.real_loader is not None:
            try:
                self.real_loader.exec_module(module)
                return
            except Exception as e:  # ImportError, OSError (libcuda.so), RuntimeError ...
                error = e
        # The real sgl_kernel is unusable here: drop whatever partial submodules it left behind.
        for name in [n for n in sys.modules if n.startswith("sgl_kernel.")]:
            del sys.modules[name]
        from tokendance_sgl import sgl_kernel_fallback

        module.__path__ = []  # a package with no submodules
        sgl_kernel_fallback.populate(module, reason=repr(error) if error else "sgl_kernel is not installed")


class SglKernelFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "sgl_kernel":
            real = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                try:
                    real = finder.find_spec(fullname, path, target)
                except Exception:
                    real = None
                if real is not None:
                    break
            loader = _FallbackLoader(real.loader if real is not None else None)
            spec = importlib.machinery.ModuleSpec(fullname, loader, origin=real.origin if real else "tokendance-fallback")
            if real is not None and real.submodule_search_locations is not None:
                spec.submodule_search_locations = list(real.submodule_search_locations)
                spec.has_location = real.has_location
            else:
                spec.submodule_search_locations = []
            return spec
        # Submodules of the fallback (`sgl_kernel.scalar_type`, ...) are not provided: their import raises
        # ModuleNotFoundError, which is what SGLang's own ImportError fallbacks expect.
        return None


def _finder_installed() -> bool:
    return any(isinstance(f, SglKernelFinder) or type(f).__name__ == "SglKernelFinder" for f in sys.meta_path)


def prepare_process() -> bool:
    """Idempotent. Returns True when the CPU environment is active in this process."""
    if host_has_cuda():
        return False
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    if "sgl_kernel" not in sys.modules and not _finder_installed():
        sys.meta_path.insert(0, SglKernelFinder())
    return True
