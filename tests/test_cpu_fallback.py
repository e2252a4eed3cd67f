"""The `sgl_kernel` CPU fallback: its ops against straightforward loops, and when it is (not) used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tokendance_sgl import sgl_kernel_fallback as fb


def test_assign_req_to_token_pool_matches_loop():
    g = torch.Generator().manual_seed(0)
    req_to_token = torch.zeros(6, 32, dtype=torch.int32)
    expected = req_to_token.clone()
    rows = torch.tensor([3, 1, 5], dtype=torch.int64)
    starts = torch.tensor([0, 7, 30], dtype=torch.int64)
    ends = torch.tensor([5, 19, 32], dtype=torch.int64)
    total = int((ends - starts).sum())
    out_cache_loc = torch.randint(1, 1000, (total,), generator=g, dtype=torch.int64)
    k = 0
    for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist()):
        for pos in range(s, e):
            expected[r, pos] = int(out_cache_loc[k])
            k += 1
    fb.assign_req_to_token_pool_cpu(rows, req_to_token, starts, ends, out_cache_loc, req_to_token.shape[1])
    assert torch.equal(req_to_token, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_all_layer_kv_cache_matches_loop(dtype):
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(40, 3, 8, generator=g).to(dtype) for _ in range(4)]
    expected = [t.clone() for t in layers]
    # overlapping source and target sets: every source is read before any target is written
    src = torch.tensor([1, 2, 3, 9], dtype=torch.int64)
    tgt = torch.tensor([2, 3, 30, 1], dtype=torch.int64)
    for t in expected:
        snapshot = t.clone()
        for s, d in zip(src.tolist(), tgt.tolist()):
            t[d] = snapshot[s]
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.uint64)
    strides = torch.tensor([t[0].numel() * t.element_size() for t in layers], dtype=torch.int64)
    fb.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, want in zip(layers, expected):
        assert torch.equal(got, want)


def _run(code: str, env_extra: dict[str, str], pythonpath: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    env.update(env_extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


PROBE = """
    import os, sys
    import sgl_kernel
    print(os.environ.get("SGLANG_USE_CPU_ENGINE"), getattr(sgl_kernel, "__tokendance_fallback__", False))
"""


def test_fallback_active_in_every_new_process_on_cpu_host():
    # A fresh interpreter that never imports tokendance_sgl itself: the .pth bootstrap must act.
    assert _run(PROBE, {"TOKENDANCE_CPU": "1"}) == "1 True"


def test_fallback_missing_ops_raise_not_implemented_naming_the_op():
    code = """
        import sgl_kernel
        try:
            sgl_kernel.rmsnorm_cpu(1)
        except NotImplementedError as e:
            print("rmsnorm_cpu" in str(e))
    """
    assert _run(code, {"TOKENDANCE_CPU": "1"}) == "True"


def test_fallback_not_used_when_real_sgl_kernel_imports(tmp_path):
    pkg = tmp_path / "sgl_kernel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    code = PROBE + "\n    print(getattr(sgl_kernel, 'REAL', False))\n"
    assert _run(code, {"TOKENDANCE_CPU": "1"}, pythonpath=str(tmp_path)).splitlines() == ["1 False", "True"]


def test_nothing_active_on_gpu_host(tmp_path):
    code = """
        import os, sys
        import tokendance_sgl
        print(tokendance_sgl.CPU_MODE, os.environ.get("SGLANG_USE_CPU_ENGINE"),
              any(type(f).__name__ == "SglKernelFinder" for f in sys.meta_path))
    """
    assert _run(code, {"TOKENDANCE_CPU": "0"}) == "False None False"
