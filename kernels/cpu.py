"""The CPU path of selective-recompute attention: torch's fused scaled-dot-product attention, one call per request.

``kernels.reference.selective_extend_attention_ref`` is the oracle every implementation is tested against; it
materializes the fp32 score matrix of every request, repeats K/V over the query groups, and is several times slower
than a fused kernel on CPU, where it used to run the whole pre-pass. Here each request's queries attend to its row
through ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (row ``<= q_rows``, ``< seq_len``)
and GQA handled inside the kernel (``enable_gqa``), so nothing is repeated. The result equals the reference within
the float tolerance of the tests; a soft cap (``logit_cap > 0``), which SDPA lacks, runs the reference.

Imports only torch (this package's rule); the index handling reads the query grouping on the host, which is free on
CPU tensors (the dispatcher sends CUDA tensors to Triton).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .reference import selective_extend_attention_ref

__all__ = ["selective_extend_attention_cpu"]


def selective_extend_attention_cpu(
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
    **_tuning: Any,
) -> torch.Tensor:
    """Same contract as the reference (``kernels.selective_extend_attention``); a query that sees no key gets zeros."""
    if logit_cap > 0:
        return selective_extend_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, q_req,
                                              q_rows, sm_scale=sm_scale, logit_cap=logit_cap, out=out)
    n_q, heads, head_dim = q.shape
    kv_heads, v_dim = k_buffer.shape[1], v_buffer.shape[2]
    if heads % kv_heads or k_buffer.shape[2] != head_dim:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_buffer.shape)}")
    if out is None:
        out = q.new_empty((n_q, heads, v_dim))
    if n_q == 0:
        return out
    q_req = q_req.to(q.device, torch.int64)
    q_rows = q_rows.to(q.device, torch.int64)
    for b in torch.unique(q_req).tolist():
        idx = (q_req == b).nonzero().squeeze(1)
        seq_len = int(seq_lens[b])
        if seq_len == 0:
            out[idx] = 0
            continue
        slots = req_to_token[int(req_pool_indices[b]), :seq_len].to(torch.int64)
        k = k_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, L, D]
        v = v_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        qq = q.index_select(0, idx).transpose(0, 1).unsqueeze(0).to(k.dtype)  # [1, heads, n, D]
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_rows.index_select(0, idx)[:, None]
        o = F.scaled_dot_product_attention(qq, k, v, attn_mask=visible, scale=sm_scale,
                                           enable_gqa=heads != kv_heads)
        out[idx] = o[0].transpose(0, 1).nan_to_num(0.0).to(out.dtype)  # a query with no visible key -> 0
    return out
