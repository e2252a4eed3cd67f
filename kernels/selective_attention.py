"""Triton attention for query tokens at arbitrary rows of their requests (selective recompute).

Query ``i`` belongs to request ``q_req[i]`` and sits at row ``q_rows[i]`` of that request; it attends to key rows
``0..q_rows[i]`` (and ``< seq_lens[b]``) of the request's slot row ``req_to_token[req_pool_indices[b]]`` in one layer's
K/V buffers. This equals full causal attention evaluated at those rows.

Work decomposition (no host synchronisation): the launcher sorts the queries by (request, row) on the device and cuts
every request's queries into blocks of ``BLOCK_M``; the grid has ``cdiv(n_q, BLOCK_M) + min(batch, n_q)`` programs
along axis 0 (an upper bound on the number of blocks; spare programs do nothing) and one program per query head along
axis 1 (GQA: kv head = head // (heads // kv_heads)). A program streams the request's keys in blocks of ``BLOCK_N`` with
an online softmax in fp32 (flash-attention style): key blocks below the block's smallest query row need no mask,
the rest are masked by ``key_row <= q_row`` and ``key_row < seq_len``. The optional soft cap
``cap * tanh(s / cap)`` is applied to the scaled logits before masking, as SGLang does. The plan (sorting and block
table) depends only on the queries, so callers running many layers compute it once with
``plan_selective_attention`` and pass it to every layer.

Interpreter notes (``TRITON_INTERPRET=1``, CPU tensors): reductions use ``tl.reduce`` with triton's own max/sum combine
functions so that the kernel also runs when triton itself was imported before the interpreter was switched on; and the
interpreter's ``tl.dot`` multiplies the raw bits of bf16 operands (triton 3.8), so on CPU both dots upcast to fp32
first (``DOT_F32``; p is still rounded to V's dtype as on the GPU). CUDA launches use the native bf16/fp16 dots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import LaunchSpec, next_pow2

_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine
LOG2E = 1.4426950408889634


class SelectivePlan(NamedTuple):
    """Device-side work plan of one set of queries (reusable across layers)."""

    order: torch.Tensor  # int64 [n_q]: sorted position -> original query index
    blk_req: torch.Tensor  # int64 [grid]: request of each program (clamped into range)
    blk_begin: torch.Tensor  # int64 [grid]: first sorted query position of each program
    blk_end: torch.Tensor  # int64 [grid]: end position (== begin for idle programs)
    block_m: int
    n_q: int
    batch: int


def plan_selective_attention(
    q_req: torch.Tensor, q_rows: torch.Tensor, batch: int, *, block_m: int
) -> SelectivePlan:
    """Sort queries by (request, row) and cut each request's queries into blocks of ``block_m`` (device ops only)."""
    n_q = q_req.numel()
    dev = q_req.device
    req = q_req.to(torch.int64)
    rows = q_rows.to(device=dev, dtype=torch.int64).clamp(-(2**31), 2**31 - 1) + 2**31
    order = torch.argsort(req * (2**32) + rows, stable=True)
    counts = torch.zeros(batch, dtype=torch.int64, device=dev).index_add_(0, req, torch.ones_like(req))
    n_blocks = (counts + block_m - 1) // block_m
    blk_cum = torch.cumsum(n_blocks, 0)
    q_end = torch.cumsum(counts, 0)
    q_begin = q_end - counts
    grid = triton.cdiv(n_q, block_m) + min(batch, n_q)
    pids = torch.arange(grid, dtype=torch.int64, device=dev)
    b = torch.searchsorted(blk_cum, pids, right=True)
    valid = b < batch
    bc = b.clamp(max=batch - 1)
    local = pids - (blk_cum[bc] - n_blocks[bc])
    begin = q_begin[bc] + local * block_m
    end = torch.where(valid, torch.minimum(begin + block_m, q_end[bc]), begin)
    return SelectivePlan(order, bc, begin, end, block_m, n_q, batch)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    req_to_token,
    tok_base,
    start,
    q_row,
    seq_len,
    kv_head,
    sm_scale,
    logit_cap,
    stride_kr,
    stride_kh,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vd,
    offs_d,
    mask_d,
    offs_dv,
    mask_dv,
    BLOCK_N: tl.constexpr,
    HAS_CAP: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    offs_k = start + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_k = offs_k < seq_len
        slots = tl.load(req_to_token + tok_base + offs_k, mask=mask_k, other=0).to(tl.int64)
        k = tl.load(
            K + slots[None, :] * stride_kr + kv_head * stride_kh + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None] & mask_k[None, :],
            other=0.0,
        )
    else:
        slots = tl.load(req_to_token + tok_base + offs_k).to(tl.int64)
        k = tl.load(
            K + slots[None, :] * stride_kr + kv_head * stride_kh + offs_d[:, None] * stride_kd,
            mask=mask_d[:, None],
            other=0.0,
        )
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision=DOT_PREC) * sm_scale
    else:
        s = tl.dot(q, k, input_precision=DOT_PREC) * sm_scale
    if HAS_CAP:
        s = logit_cap * _tanh(s / logit_cap)
    s = s * 1.4426950408889634
    if MASKED:
        visible = (offs_k[None, :] <= q_row[:, None]) & mask_k[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    if MASKED:
        v = tl.load(
            V + slots[:, None] * stride_vr + kv_head * stride_vh + offs_dv[None, :] * stride_vd,
            mask=mask_k[:, None] & mask_dv[None, :],
            other=0.0,
        )
    else:
        v = tl.load(
            V + slots[:, None] * stride_vr + kv_head * stride_vh + offs_dv[None, :] * stride_vd,
            mask=mask_dv[None, :],
            other=0.0,
        )
    if DOT_F32:  # same rounding of p as on the GPU, products and sums in fp32
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=DOT_PREC)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _selective_attention_kernel(
    Q,
    K,
    V,
    Out,
    req_to_token,
    req_pool_indices,
    seq_lens,
    q_rows_ptr,
    order_ptr,
    blk_req_ptr,
    blk_begin_ptr,
    blk_end_ptr,
    sm_scale,
    logit_cap,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kr,
    stride_kh,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vd,
    stride_on,
    stride_oh,
    stride_od,
    stride_rt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # longest blocks (latest rows) first: shorter tail
    head = tl.program_id(1)
    kv_head = head // GROUP
    b = tl.load(blk_req_ptr + pid)
    begin = tl.load(blk_begin_ptr + pid)
    end = tl.load(blk_end_ptr + pid)

    pos = begin + tl.arange(0, BLOCK_M)
    mask_m = pos < end
    qi = tl.load(order_ptr + pos, mask=mask_m, other=0)
    q_row = tl.load(q_rows_ptr + qi, mask=mask_m, other=-1).to(tl.int64)
    seq_len = tl.load(seq_lens + b).to(tl.int64)
    tok_base = tl.load(req_pool_indices + b).to(tl.int64) * stride_rt

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < V_DIM
    q = tl.load(
        Q + qi[:, None] * stride_qn + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )

    # Keys [0, n_full) are visible to every query of the block; [n_full, k_end) need the mask.
    row_max = tl.reduce(tl.where(mask_m, q_row, -1), 0, _MAX)
    row_min = tl.reduce(tl.where(mask_m, q_row, 2**62), 0, _MIN)
    k_end = tl.minimum(row_max + 1, seq_len)
    k_full = tl.maximum(tl.minimum(row_min + 1, k_end), 0)
    n_full = (k_full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    for start in tl.range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, K, V, req_to_token, tok_base, start, q_row, seq_len, kv_head, sm_scale, logit_cap,
            stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd, offs_d, mask_d, offs_dv, mask_dv,
            BLOCK_N, HAS_CAP, False, DOT_PREC, DOT_F32,
        )
    for start in tl.range(n_full, k_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, K, V, req_to_token, tok_base, start, q_row, seq_len, kv_head, sm_scale, logit_cap,
            stride_kr, stride_kh, stride_kd, stride_vr, stride_vh, stride_vd, offs_d, mask_d, offs_dv, mask_dv,
            BLOCK_N, HAS_CAP, True, DOT_PREC, DOT_F32,
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + qi[:, None] * stride_on + head * stride_oh + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_dv[None, :],
    )


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Block sizes and launch options. bf16/fp16 on CUDA: Hopper/Ampere-style tensor-core tiles (checked free of
    register spills for sm_90 with ``aot``); fp32 runs its dots in IEEE fp32 (no tf32), which needs small tiles;
    CPU (interpreter): small tiles."""
    if device.type != "cuda":
        return {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1}
    big_d = head_dim > 64
    if dtype == torch.float32:
        return {"block_m": 32, "block_n": 32, "num_warps": 8 if big_d else 4, "num_stages": 1}
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        return {"block_m": 128 if major >= 9 else 64, "block_n": 64, "num_warps": 8 if big_d else 4, "num_stages": 1}
    return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1}


def selective_attention_spec(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    q_req: torch.Tensor,
    q_rows: torch.Tensor,
    out: torch.Tensor,
    *,
    sm_scale: float,
    logit_cap: float = 0.0,
    plan: SelectivePlan | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> LaunchSpec | None:
    """The launch writing ``out`` (``None`` when there are no queries)."""
    n_q, heads, head_dim = q.shape
    rows, kv_heads, k_dim = k_buffer.shape
    v_dim = v_buffer.shape[2]
    if k_dim != head_dim or v_buffer.shape[:2] != k_buffer.shape[:2] or heads % kv_heads:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_buffer.shape)}, v {tuple(v_buffer.shape)}")
    if q_req.numel() != n_q or q_rows.numel() != n_q:
        raise ValueError("q_req and q_rows need one entry per query")
    if req_to_token.dim() != 2 or req_to_token.stride(1) != 1:
        raise ValueError("req_to_token must be 2-D with contiguous rows")
    if out.shape != (n_q, heads, v_dim):
        raise ValueError(f"out must have shape {(n_q, heads, v_dim)}, got {tuple(out.shape)}")
    batch = req_pool_indices.numel()
    if n_q == 0:
        return None
    if batch == 0:
        raise ValueError("queries given but the batch is empty")
    cfg = default_config(head_dim, q.dtype, q.device)
    block_m = block_m or (plan.block_m if plan is not None else cfg["block_m"])
    block_n = block_n or cfg["block_n"]
    if plan is None:
        plan = plan_selective_attention(q_req, q_rows, batch, block_m=block_m)
    elif plan.block_m != block_m or plan.n_q != n_q or plan.batch != batch:
        raise ValueError("plan was built for other queries or another block_m")
    return LaunchSpec(
        _selective_attention_kernel,
        (plan.blk_req.numel(), heads),
        (
            q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, q_rows.contiguous(),
            plan.order, plan.blk_req, plan.blk_begin, plan.blk_end, float(sm_scale), float(logit_cap),
            *q.stride(), *k_buffer.stride(), *v_buffer.stride(), *out.stride(), req_to_token.stride(0),
        ),
        dict(
            GROUP=heads // kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, next_pow2(head_dim)),
            V_DIM=v_dim,
            BLOCK_DV=max(16, next_pow2(v_dim)),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HAS_CAP=logit_cap > 0,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
            DOT_F32=not q.is_cuda,
            num_warps=num_warps or cfg["num_warps"],
            num_stages=num_stages or cfg["num_stages"],
        ),
    )


def selective_extend_attention_triton(
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
    out: torch.Tensor | None = None,
    plan: SelectivePlan | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` ``[n_q, heads, head_dim]`` at rows ``q_rows`` of requests ``q_req`` (see module docstring).
    Returns ``out`` ``[n_q, heads, v_head_dim]`` in ``q``'s dtype. Pass ``plan`` (from ``plan_selective_attention``
    with the same ``block_m``) to reuse the query plan across layers; ``block_m``, ``block_n``, ``num_warps`` and
    ``num_stages`` override ``default_config``."""
    if out is None:
        out = q.new_empty((q.shape[0], q.shape[1], v_buffer.shape[2]))
    spec = selective_attention_spec(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, q_req, q_rows, out,
        sm_scale=sm_scale, logit_cap=logit_cap, plan=plan, block_m=block_m, block_n=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    if spec is not None:
        spec.launch()
    return out
