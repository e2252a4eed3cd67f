"""Ahead-of-time compilation of launch specs for an NVIDIA target, without a GPU (a development check).

``compile_spec(spec, arch=90)`` compiles the exact launch a launcher would make (same argument types, the same
divisibility-by-16 and ``== 1`` specialisations as triton's JIT; specs may be built from CPU tensors, flags that only
serve the CPU interpreter are switched off) down to PTX and cubin with triton's bundled ptxas, and
reports registers, spills and the width of every global load/store (scalar 2-byte accesses of bf16 data mean the
compiler could not vectorise). Only valid when the kernels were
defined without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, native_specialize_impl

from ._common import LaunchSpec

_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_INTERPRETER_ONLY_FLAGS = {"DOT_F32": False}  # specs built from CPU tensors carry these; a GPU launch would not


def compile_spec(spec: LaunchSpec, *, arch: int = 90) -> dict[str, Any]:
    """Compile ``spec`` for ``sm_<arch>``; returns kernel name, registers, spills, global memory ops by width."""
    fn = spec.kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError("aot needs the compiled (not interpreted) kernels: unset TRITON_INTERPRET")
    values = dict(zip(fn.arg_names, spec.args))
    values.update({k: v for k, v in spec.kwargs.items() if k not in _OPTION_KEYS})
    values.update({k: v for k, v in _INTERPRETER_ONLY_FLAGS.items() if k in values})
    options = {k: v for k, v in spec.kwargs.items() if k in _OPTION_KEYS}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    mem_ops = re.findall(r"\b(ld|st)\.global(?:\.nc)?(\.v[248])?\.(?:b|u|s|f)(\d+)", ptx)
    report: dict[str, Any] = {
        "kernel": fn.__name__,
        "arch": f"sm_{arch}",
        "options": options,
        "global_mem_ops": len(mem_ops),
        "global_mem_ops_by_bytes": _by_width(mem_ops),
        "shared_bytes": compiled.metadata.shared,
    }
    report.update(_ptxas_usage(ptx, arch))
    return report


def _by_width(mem_ops: list[tuple[str, str, str]]) -> dict[str, int]:
    """Count of global loads/stores per access width in bytes (16 = one 128-bit vector per thread)."""
    counts: dict[str, int] = {}
    for _, vec, bits in mem_ops:
        width = (int(vec[2:]) if vec else 1) * int(bits) // 8
        counts[str(width)] = counts.get(str(width), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (triton's bundled ptxas)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
        suffix = "a" if arch == 90 else ""
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True)
    except Exception:  # pragma: no cover - informative only
        return {}
    log = res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_bytes": (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0),
    }
