"""Triton batched copy of K/V pool rows over all layers in one launch.

``copy_kv_spec`` builds the launch copying dims ``[k_dim_start, head_dim)`` of every K head and all dims of every V head from rows ``src`` to
rows ``dst`` of every layer. ``copy_kv_slots`` is the plain case (``k_dim_start=0``); ``copy_rerotate_k`` uses it for the
non-rotary part of K and for V. Grid: (blocks of ``BLOCK_N`` slots, groups of layers), heads unrolled in the program.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LayerSet, LaunchSpec, block_rows, check_rows, layer_set, layers_per_program, next_pow2



@triton.jit
def _copy_rows(
    first,
    table,
    src_rows,  # [BLOCK_N, 1] int64 row indices
    dst_rows,
    mask_n,  # [BLOCK_N, 1]
    layer,
    stride_row,
    stride_head,
    stride_dim,
    HEADS: tl.constexpr,
    DIM_START: tl.constexpr,
    DIM_END: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIT: tl.constexpr,
):
    base = first + tl.load(table + layer) * UNIT
    offs_d = DIM_START + tl.arange(0, BLOCK_D)
    mask = mask_n & (offs_d < DIM_END)[None, :]
    off_d = offs_d[None, :] * stride_dim
    for h in tl.static_range(HEADS):
        head = base + h * stride_head
        x = tl.load(head + src_rows * stride_row + off_d, mask=mask)
        tl.store(head + dst_rows * stride_row + off_d, x, mask=mask)


@triton.jit
def _copy_kv_kernel(
    k_first,
    k_table,
    v_first,
    v_table,
    src_ptr,
    dst_ptr,
    n,
    num_layers,
    layers_per_prog,
    stride_kr,
    stride_kh,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vd,
    K_HEADS: tl.constexpr,
    K_START: tl.constexpr,
    K_END: tl.constexpr,
    BLOCK_K: tl.constexpr,
    V_HEADS: tl.constexpr,
    V_END: tl.constexpr,
    BLOCK_V: tl.constexpr,
    COPY_K: tl.constexpr,
    K_UNIT: tl.constexpr,
    V_UNIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_l = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    src = tl.load(src_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)[:, None]
    dst = tl.load(dst_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)[:, None]
    mask_n = mask_n[:, None]
    layer_lo = pid_l * layers_per_prog
    layer_hi = tl.minimum(layer_lo + layers_per_prog, num_layers)
    for layer in tl.range(layer_lo, layer_hi):
        if COPY_K:
            _copy_rows(k_first, k_table, src, dst, mask_n, layer, stride_kr, stride_kh, stride_kd,
                       K_HEADS, K_START, K_END, BLOCK_K, K_UNIT)
        _copy_rows(v_first, v_table, src, dst, mask_n, layer, stride_vr, stride_vh, stride_vd,
                   V_HEADS, 0, V_END, BLOCK_V, V_UNIT)


def copy_kv_spec(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    v_buffers: Sequence[torch.Tensor] | torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    k_dim_start: int = 0,
    block_n: int | None = None,
    layers_per_prog: int | None = None,
) -> LaunchSpec | None:
    """The launch copying K dims ``[k_dim_start, head_dim)`` and all V dims of rows ``src`` to rows ``dst`` in every
    layer (``None`` when there is nothing to do)."""
    ks: LayerSet = layer_set(k_buffers, "k_buffers")
    vs: LayerSet = layer_set(v_buffers, "v_buffers")
    if ks.num_layers != vs.num_layers or ks.first.device != vs.first.device or ks.rows != vs.rows:
        raise ValueError("k_buffers and v_buffers must have the same number of layers, rows and device")
    n = check_rows("src", src).numel()
    check_rows("dst", dst, n)
    if n == 0:
        return None
    dev = ks.first.device
    src, dst = src.to(dev).contiguous(), dst.to(dev).contiguous()
    block_n = block_n or block_rows(next_pow2(max(ks.dim - k_dim_start, vs.dim)), ks.first.element_size())
    n_blocks = triton.cdiv(n, block_n)
    lpp = layers_per_prog or layers_per_program(n_blocks, ks.num_layers, dev)
    return LaunchSpec(
        _copy_kv_kernel,
        (n_blocks, triton.cdiv(ks.num_layers, lpp)),
        (
            ks.first, ks.table, vs.first, vs.table, src, dst, n, ks.num_layers, lpp,
            ks.stride_row, ks.stride_head, ks.stride_dim, vs.stride_row, vs.stride_head, vs.stride_dim,
        ),
        dict(
            K_HEADS=ks.heads,
            K_START=k_dim_start,
            K_END=ks.dim,
            BLOCK_K=next_pow2(max(1, ks.dim - k_dim_start)),
            V_HEADS=vs.heads,
            V_END=vs.dim,
            BLOCK_V=next_pow2(vs.dim),
            COPY_K=k_dim_start < ks.dim,
            K_UNIT=ks.unit,
            V_UNIT=vs.unit,
            BLOCK_N=block_n,
            num_warps=4,
        ),
    )


def copy_kv_slots_triton(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    v_buffers: Sequence[torch.Tensor] | torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    block_n: int | None = None,
    layers_per_prog: int | None = None,
) -> None:
    """Copy K and V rows ``src`` to rows ``dst`` in every layer (one launch). ``src`` and ``dst`` must be disjoint and
    ``dst`` must not repeat."""
    spec = copy_kv_spec(k_buffers, v_buffers, src, dst, block_n=block_n, layers_per_prog=layers_per_prog)
    if spec is not None:
        spec.launch()
