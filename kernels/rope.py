"""Triton RoPE re-rotation of K rows in the KV pool, all layers in one launch.

Moving cached K from position p to p' is one rotation by ``delta = p' - p`` of every RoPE pair (docs/architecture.md, "Re-rotation"):
``x' = x cos(delta theta_j) - y sin(delta theta_j)``, ``y' = y cos(delta theta_j) + x sin(delta theta_j)``, with NeoX pairs
``(x[j], x[j + rotary_dim/2])`` or GPT-J pairs ``(x[2j], x[2j+1])``. Math in fp32 whatever the storage dtype.

Grid: (blocks of ``BLOCK_N`` slots, groups of layers). A program computes cos/sin of its slots once and applies them to
every head of every layer in its group, so the trig cost is amortised over layers and heads; the layer buffers are
reached through a table of offsets from layer 0 (see ``_common``). NeoX halves are loaded as two contiguous vectors;
GPT-J pairs are loaded as one contiguous vector and de-interleaved in registers (reshape + split). Only the first ``rotary_dim`` dims are read and written
here; ``copy_rerotate_k`` copies the rest of K and all of V with ``kv_copy`` (a second launch).

This module imports triton at import time; the package imports it lazily, so that TRITON_INTERPRET is read when the
first Triton launcher is called.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LaunchSpec, block_rows, check_rows, layer_set, layers_per_program, next_pow2, resolve_inv_freq
from .kv_copy import copy_kv_spec



@triton.jit
def _rerotate_kernel(
    k_first,  # layer 0's K buffer (typed pointer)
    k_table,  # int64 [num_layers]: offset of each layer from layer 0, in units of UNIT elements
    src_ptr,  # [n] rows read (== dst for in-place)
    dst_ptr,  # [n] rows written
    delta_ptr,  # [n] position change
    inv_freq_ptr,  # fp32 [HALF]
    n,
    num_layers,
    layers_per_prog,
    stride_row,
    stride_head,
    stride_dim,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    UNIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_l = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    dst = tl.load(dst_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    src = tl.load(src_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    delta = tl.load(delta_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)

    offs_j = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_j, mask=offs_j < HALF, other=0.0)
    angle = delta[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    src_rows = src[:, None] * stride_row
    dst_rows = dst[:, None] * stride_row
    if IS_NEOX:
        # pairs (j, j + HALF): two contiguous halves
        mask = mask_n[:, None] & (offs_j < HALF)[None, :]
        off_x = offs_j[None, :] * stride_dim
        off_y = (offs_j + HALF)[None, :] * stride_dim
    else:
        # pairs (2j, 2j + 1): load the rotary part contiguously and de-interleave in registers
        offs_r = tl.arange(0, 2 * BLOCK_HALF)
        mask = mask_n[:, None] & (offs_r < 2 * HALF)[None, :]
        off_r = offs_r[None, :] * stride_dim

    layer_lo = pid_l * layers_per_prog
    layer_hi = tl.minimum(layer_lo + layers_per_prog, num_layers)
    for layer in tl.range(layer_lo, layer_hi):
        base = k_first + tl.load(k_table + layer) * UNIT
        for h in tl.static_range(KV_HEADS):
            head = base + h * stride_head
            if IS_NEOX:
                x = tl.load(head + src_rows + off_x, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(head + src_rows + off_y, mask=mask, other=0.0).to(tl.float32)
                tl.store(head + dst_rows + off_x, (x * cos - y * sin).to(k_first.dtype.element_ty), mask=mask)
                tl.store(head + dst_rows + off_y, (y * cos + x * sin).to(k_first.dtype.element_ty), mask=mask)
            else:
                xy = tl.load(head + src_rows + off_r, mask=mask, other=0.0).to(tl.float32)
                x, y = tl.split(tl.reshape(xy, [BLOCK_N, BLOCK_HALF, 2]))
                out = tl.reshape(tl.join(x * cos - y * sin, y * cos + x * sin), [BLOCK_N, 2 * BLOCK_HALF])
                tl.store(head + dst_rows + off_r, out.to(k_first.dtype.element_ty), mask=mask)


def rerotate_spec(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    delta: torch.Tensor,
    *,
    rope_theta: float,
    rotary_dim: int,
    is_neox: bool = True,
    inv_freq: torch.Tensor | None = None,
    block_n: int | None = None,
    layers_per_prog: int | None = None,
) -> LaunchSpec | None:
    """The launch rotating rows ``src`` into rows ``dst`` (``None`` when there is nothing to do)."""
    ks = layer_set(k_buffers, "k_buffers")
    n = check_rows("dst", dst).numel()
    check_rows("src", src, n)
    check_rows("delta", delta, n)
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > ks.dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={ks.dim}], got {rotary_dim}")
    if n == 0:
        return None
    dev = ks.first.device
    inv = resolve_inv_freq(inv_freq, rope_theta, rotary_dim, dev)
    src, dst, delta = (t.to(dev).contiguous() for t in (src, dst, delta))
    half = rotary_dim // 2
    block_n = block_n or block_rows(next_pow2(half), ks.first.element_size())
    n_blocks = triton.cdiv(n, block_n)
    lpp = layers_per_prog or layers_per_program(n_blocks, ks.num_layers, dev)
    return LaunchSpec(
        _rerotate_kernel,
        (n_blocks, triton.cdiv(ks.num_layers, lpp)),
        (ks.first, ks.table, src, dst, delta, inv, n, ks.num_layers, lpp, ks.stride_row, ks.stride_head, ks.stride_dim),
        dict(
            KV_HEADS=ks.heads,
            HALF=half,
            BLOCK_HALF=next_pow2(half),
            IS_NEOX=bool(is_neox),
            UNIT=ks.unit,
            BLOCK_N=block_n,
            num_warps=4,
        ),
    )


def rerotate_k_triton(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    slots: torch.Tensor,
    delta: torch.Tensor,
    *,
    rope_theta: float,
    rotary_dim: int,
    is_neox: bool = True,
    inv_freq: torch.Tensor | None = None,
    block_n: int | None = None,
    layers_per_prog: int | None = None,
) -> None:
    """In place: rotate the first ``rotary_dim`` dims of K rows ``slots`` of every layer by ``delta`` positions.
    ``slots`` must not repeat (two programs would race on one row)."""
    spec = rerotate_spec(
        k_buffers, slots, slots, delta, rope_theta=rope_theta, rotary_dim=rotary_dim, is_neox=is_neox,
        inv_freq=inv_freq, block_n=block_n, layers_per_prog=layers_per_prog,
    )
    if spec is not None:
        spec.launch()


def copy_rerotate_k_triton(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    v_buffers: Sequence[torch.Tensor] | torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    delta: torch.Tensor,
    *,
    rope_theta: float,
    rotary_dim: int,
    is_neox: bool = True,
    inv_freq: torch.Tensor | None = None,
    block_n: int | None = None,
    layers_per_prog: int | None = None,
) -> None:
    """Copy K and V rows ``src`` to rows ``dst`` in every layer, K rotated by ``delta`` on the way.
    ``src`` and ``dst`` must be disjoint and ``dst`` must not repeat (two launches: rotated part, then the rest)."""
    spec = rerotate_spec(
        k_buffers, src, dst, delta, rope_theta=rope_theta, rotary_dim=rotary_dim, is_neox=is_neox,
        inv_freq=inv_freq, block_n=block_n, layers_per_prog=layers_per_prog,
    )
    copy = copy_kv_spec(k_buffers, v_buffers, src, dst, k_dim_start=rotary_dim, block_n=block_n,
                        layers_per_prog=layers_per_prog)
    for s in (spec, copy):
        if s is not None:
            s.launch()
