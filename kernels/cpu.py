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

from .reference import attention_output, request_queries, selective_extend_attention_ref

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
    out = attention_output(q, k_buffer, v_buffer, out)
    gqa = q.shape[1] != k_buffer.shape[1]
    q_rows = q_rows.to(q.device, torch.int64)
    for idx, slots in request_queries(q, req_to_token, req_pool_indices, seq_lens, q_req):
        seq_len = slots.numel()
        if seq_len == 0:
            out[idx] = 0
            continue
        k = k_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, L, D]
        v = v_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        qq = q.index_select(0, idx).transpose(0, 1).unsqueeze(0).to(k.dtype)  # [1, heads, n, D]
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_rows.index_select(0, idx)[:, None]
        o = F.scaled_dot_product_attention(qq, k, v, attn_mask=visible, scale=sm_scale,
                                           enable_gqa=gqa)
        out[idx] = o[0].transpose(0, 1).nan_to_num(0.0).to(out.dtype)  # a query with no visible key -> 0
    return out
