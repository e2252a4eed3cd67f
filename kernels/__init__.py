"""Kernels of tokendance-sgl (installed as ``tokendance_sgl.kernels``): K re-rotation over pool slots, K/V slot copies
and selective-recompute attention, each as a Triton launcher (``*_triton``), a torch reference (``*_ref``) and a
dispatcher (plain name).

Dispatch: Triton when the tensors are on CUDA, otherwise the reference, except selective attention, whose CPU path
is torch's fused SDPA (``cpu.py``; the reference stays the oracle of the tests). ``TOKENDANCE_KERNEL_BACKEND`` (read
at call time) overrides it: ``torch`` always uses the references, ``triton`` always uses Triton (on CPU tensors that
needs ``TRITON_INTERPRET=1``), ``auto`` (default) as above.

This package imports only torch at import time and uses relative imports only: no sglang, no ``tokendance_sgl``.
Triton is imported the first time a Triton launcher runs, so ``TRITON_INTERPRET=1`` can still be set after importing
the package (the Triton modules are ``rope``, ``kv_copy`` and ``selective_attention``).

Index tensors (``slots``, ``src``, ``dst``, ``delta``, ``q_req``, ``q_rows``) may be any integer dtype and stride.
Rows written by one call must be distinct, and for copies disjoint from the rows read.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Sequence

import torch

from ._common import rope_inv_freq
from .cpu import selective_extend_attention_cpu
from .reference import (
    copy_kv_slots_ref,
    copy_rerotate_k_ref,
    rerotate_k_ref,
    selective_extend_attention_ref,
)

__all__ = [
    "rerotate_k",
    "rerotate_k_ref",
    "rerotate_k_triton",
    "copy_rerotate_k",
    "copy_rerotate_k_ref",
    "copy_rerotate_k_triton",
    "copy_kv_slots",
    "copy_kv_slots_ref",
    "copy_kv_slots_triton",
    "selective_extend_attention",
    "selective_extend_attention_ref",
    "selective_extend_attention_cpu",
    "selective_extend_attention_triton",
    "plan_selective_attention",
    "rope_inv_freq",
    "use_triton",
    "TRITON_MODULES",
]

TRITON_MODULES = ("kv_copy", "rope", "selective_attention")

Buffers = Sequence[torch.Tensor] | torch.Tensor


def _triton_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def _forced() -> str:
    """``TOKENDANCE_KERNEL_BACKEND``: ``auto``, ``torch`` or ``triton``."""
    backend = os.environ.get("TOKENDANCE_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"TOKENDANCE_KERNEL_BACKEND must be auto, torch or triton, got {backend!r}")
    return backend


def use_triton(t: torch.Tensor) -> bool:
    """Whether the dispatcher runs Triton for tensors like ``t`` (see the module docstring)."""
    backend = _forced()
    return t.is_cuda if backend == "auto" else backend == "triton"


def _first(buffers: Buffers) -> torch.Tensor:
    return buffers if isinstance(buffers, torch.Tensor) else buffers[0]


# ---- Triton launchers (lazy import of triton) -------------------------------------------------------------------


def rerotate_k_triton(k_buffers: Buffers, slots: torch.Tensor, delta: torch.Tensor, **kw: Any) -> None:
    """Triton ``rerotate_k`` (see ``rope.rerotate_k_triton``)."""
    _triton_module("rope").rerotate_k_triton(k_buffers, slots, delta, **kw)


def copy_rerotate_k_triton(
    k_buffers: Buffers, v_buffers: Buffers, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor, **kw: Any
) -> None:
    """Triton ``copy_rerotate_k`` (see ``rope.copy_rerotate_k_triton``)."""
    _triton_module("rope").copy_rerotate_k_triton(k_buffers, v_buffers, src, dst, delta, **kw)


def copy_kv_slots_triton(k_buffers: Buffers, v_buffers: Buffers, src: torch.Tensor, dst: torch.Tensor, **kw: Any) -> None:
    """Triton ``copy_kv_slots`` (see ``kv_copy.copy_kv_slots_triton``)."""
    _triton_module("kv_copy").copy_kv_slots_triton(k_buffers, v_buffers, src, dst, **kw)


def selective_extend_attention_triton(*args: Any, **kw: Any) -> torch.Tensor:
    """Triton ``selective_extend_attention`` (see ``selective_attention.selective_extend_attention_triton``)."""
    return _triton_module("selective_attention").selective_extend_attention_triton(*args, **kw)


def plan_selective_attention(q_req: torch.Tensor, q_rows: torch.Tensor, batch: int, *, block_m: int) -> Any:
    """Query plan for ``selective_extend_attention_triton(..., plan=...)``, reusable across layers."""
    return _triton_module("selective_attention").plan_selective_attention(q_req, q_rows, batch, block_m=block_m)


def plan_selective_extend_attention(q: torch.Tensor, q_req: torch.Tensor, q_rows: torch.Tensor, batch: int) -> Any:
    """The plan :func:`selective_extend_attention` would build for queries like ``q`` ``[n_q, heads, head_dim]``:
    built once per forward and passed to every layer (``plan=``); None where the dispatcher runs torch."""
    if not use_triton(q):
        return None
    mod = _triton_module("selective_attention")
    block_m = mod.default_config(q.shape[-1], q.dtype, q.device)["block_m"]
    return mod.plan_selective_attention(q_req, q_rows, batch, block_m=block_m)


# ---- Dispatchers ------------------------------------------------------------------------------------------------


def rerotate_k(
    k_buffers: Buffers,
    slots: torch.Tensor,
    delta: torch.Tensor,
    *,
    rope_theta: float,
    rotary_dim: int,
    is_neox: bool = True,
    **kw: Any,
) -> None:
    """In place: rotate the first ``rotary_dim`` dims of K rows ``slots`` (int ``[n]``, distinct) of every layer by
    ``delta`` (int ``[n]``, may be negative) positions; NeoX or GPT-J pairs; fp32 math. ``inv_freq=`` overrides the
    frequencies computed from ``rope_theta`` (scaled RoPE)."""
    fn = rerotate_k_triton if use_triton(_first(k_buffers)) else rerotate_k_ref
    fn(k_buffers, slots, delta, rope_theta=rope_theta, rotary_dim=rotary_dim, is_neox=is_neox, **kw)


def copy_rerotate_k(
    k_buffers: Buffers,
    v_buffers: Buffers,
    src: torch.Tensor,
    dst: torch.Tensor,
    delta: torch.Tensor,
    *,
    rope_theta: float,
    rotary_dim: int,
    is_neox: bool = True,
    **kw: Any,
) -> None:
    """Copy K and V of rows ``src`` to rows ``dst`` in every layer, K rotated by ``delta`` on the way. ``src`` and
    ``dst`` must be disjoint, ``dst`` distinct."""
    fn = copy_rerotate_k_triton if use_triton(_first(k_buffers)) else copy_rerotate_k_ref
    fn(k_buffers, v_buffers, src, dst, delta, rope_theta=rope_theta, rotary_dim=rotary_dim, is_neox=is_neox, **kw)


def copy_kv_slots(k_buffers: Buffers, v_buffers: Buffers, src: torch.Tensor, dst: torch.Tensor, **kw: Any) -> None:
    """Copy K and V rows ``src`` to rows ``dst`` over all layers (disjoint, ``dst`` distinct)."""
    fn = copy_kv_slots_triton if use_triton(_first(k_buffers)) else copy_kv_slots_ref
    fn(k_buffers, v_buffers, src, dst, **kw)


def selective_extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    q_req: torch.Tensor,
    q_rows: torch.Tensor,
    *,
    sm_scale: float,
    logit_cap: float = 0.0,
    **kw: Any,
) -> torch.Tensor:
    """Attention for queries ``q`` ``[n_q, heads, head_dim]`` at rows ``q_rows`` of requests ``q_req`` (batch
    indices): each sees key rows ``<= q_rows`` of ``req_to_token[req_pool_indices[b], :seq_lens[b]]`` in one layer's
    ``k_buffer``/``v_buffer`` ``[rows, kv_heads, dim]``; GQA; fp32 accumulation. Returns ``[n_q, heads, v_head_dim]``
    in ``q``'s dtype; equals causal attention evaluated at those rows."""
    if use_triton(q):
        fn = selective_extend_attention_triton
    else:
        fn = selective_extend_attention_ref if _forced() == "torch" else selective_extend_attention_cpu
    return fn(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, q_req, q_rows,
        sm_scale=sm_scale, logit_cap=logit_cap, **kw,
    )
