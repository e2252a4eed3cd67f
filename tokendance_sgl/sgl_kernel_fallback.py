"""Torch implementations of the `sgl_kernel` CPU ops that SGLang 0.5.23 calls on a CPU host without AMX.

Installed as the `sgl_kernel` module by :mod:`tokendance_sgl._bootstrap` only when the real module fails to
import.  SGLang then takes its pure-torch paths for norms, activations, RoPE and attention, and needs just
these ops:

* ``assign_req_to_token_pool_cpu`` (``srt/mem_cache/allocation.py``): write each request's new slots into its
  ``req_to_token`` row.
* ``copy_all_layer_kv_cache_cpu`` (``kernels/ops/kvcache/cache_move.py``): move KV rows inside every layer
  buffer, addressed by raw data pointers and byte strides.

Every other name resolves to a function that raises ``NotImplementedError`` naming the op.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[o_i : o_i + end[i] - start[i]]``,
    where ``o_i`` is the sum of the lengths of the requests before ``i`` (batch order)."""
    del pool_len  # the row length is the tensor's own
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n > 0:
            req_to_token[row, s:e] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += max(n, 0)


def _byte_view(ptr: int, nbytes: int) -> torch.Tensor:
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.from_numpy(np.ctypeslib.as_array(buf))


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer ``b`` (base address ``data_ptrs[b]``, row size ``strides[b]`` bytes) copy row
    ``src_loc[i]`` to row ``tgt_loc[i]``.  All sources are read before any target is written, so
    overlapping source and target sets are safe (as in SGLang's Triton kernel)."""
    if tgt_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64).cpu()
    tgt = tgt_loc.to(torch.int64).cpu()
    rows = int(max(int(src.max()), int(tgt.max()))) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        table = _byte_view(int(ptr), rows * int(stride)).view(rows, int(stride))
        table[tgt] = table[src].clone()


_OPS = {
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
}


def _missing_op(module_name: str, name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"{module_name}.{name} is not available: the real sgl_kernel could not be imported on this CPU host and "
            f"tokendance-sgl's fallback implements only {sorted(_OPS)}"
        )

    op.__name__ = name
    op.__qualname__ = name
    return op


def populate(module: types.ModuleType, *, reason: str) -> None:
    """Turn `module` (the half-initialised ``sgl_kernel``) into the fallback."""
    module.__dict__.update(
        {
            "__tokendance_fallback__": True,
            "__tokendance_fallback_reason__": reason,
            "__doc__": __doc__,
            "__all__": list(_OPS),
            **_OPS,
        }
    )

    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        fn = _missing_op(module.__name__, name)
        setattr(module, name, fn)
        return fn

    module.__getattr__ = __getattr__
