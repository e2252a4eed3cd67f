"""Torch references of the kernels (CPU path of the dispatcher and ground truth of the tests).

Same signatures and semantics as the Triton launchers; written for clarity, not speed. Math in fp32, results stored in
the buffers' dtype. Copies read every source row before writing any destination row.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ._common import check_layers, check_rows, resolve_inv_freq


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate fp32 ``x[..., rotary_dim]`` by angles whose cos/sin broadcast to ``[..., rotary_dim/2]``."""
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _cos_sin(
    delta: torch.Tensor, rope_theta: float, rotary_dim: int, inv_freq: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    inv = resolve_inv_freq(inv_freq, rope_theta, rotary_dim, device)
    angle = delta.to(device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angle.cos()[:, None, :], angle.sin()[:, None, :]  # [n, 1, rotary_dim/2]


def _check_rotary_dim(rotary_dim: int, head_dim: int) -> None:
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")


def rerotate_k_ref(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    slots: torch.Tensor,
    delta: torch.Tensor,
    *,
    rope_theta: float,
    rotary_dim: int,
    is_neox: bool = True,
    inv_freq: torch.Tensor | None = None,
    **_tuning: Any,
) -> None:
    """In place: rotate the first ``rotary_dim`` dims of K rows ``slots`` of every layer by ``delta`` positions."""
    bufs = check_layers(k_buffers, "k_buffers")
    n = check_rows("slots", slots).numel()
    check_rows("delta", delta, n)
    _check_rotary_dim(rotary_dim, bufs[0].shape[2])
    if n == 0:
        return
    dev = bufs[0].device
    slots = slots.to(dev)
    cos, sin = _cos_sin(delta, rope_theta, rotary_dim, inv_freq, dev)
    for buf in bufs:
        rot = buf.index_select(0, slots)[..., :rotary_dim].float()
        buf[slots, :, :rotary_dim] = _rotate(rot, cos, sin, is_neox).to(buf.dtype)


def copy_rerotate_k_ref(
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
    **_tuning: Any,
) -> None:
    """Copy K and V rows ``src`` to rows ``dst`` in every layer, K rotated by ``delta`` on the way."""
    ks = check_layers(k_buffers, "k_buffers")
    vs = check_layers(v_buffers, "v_buffers")
    if len(ks) != len(vs):
        raise ValueError("k_buffers and v_buffers must have the same number of layers")
    n = check_rows("src", src).numel()
    check_rows("dst", dst, n)
    check_rows("delta", delta, n)
    _check_rotary_dim(rotary_dim, ks[0].shape[2])
    if n == 0:
        return
    dev = ks[0].device
    src, dst = src.to(dev), dst.to(dev)
    cos, sin = _cos_sin(delta, rope_theta, rotary_dim, inv_freq, dev)
    new_k = []
    for buf in ks:
        rows = buf.index_select(0, src)
        rot = _rotate(rows[..., :rotary_dim].float(), cos, sin, is_neox).to(buf.dtype)
        new_k.append(torch.cat((rot, rows[..., rotary_dim:]), dim=-1))
    new_v = [buf.index_select(0, src) for buf in vs]
    for buf, rows in zip(ks, new_k):
        buf.index_copy_(0, dst, rows)
    for buf, rows in zip(vs, new_v):
        buf.index_copy_(0, dst, rows)


def copy_kv_slots_ref(
    k_buffers: Sequence[torch.Tensor] | torch.Tensor,
    v_buffers: Sequence[torch.Tensor] | torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    **_tuning: Any,
) -> None:
    """Copy K and V rows ``src`` to rows ``dst`` in every layer."""
    ks = check_layers(k_buffers, "k_buffers")
    vs = check_layers(v_buffers, "v_buffers")
    if len(ks) != len(vs):
        raise ValueError("k_buffers and v_buffers must have the same number of layers")
    n = check_rows("src", src).numel()
    check_rows("dst", dst, n)
    if n == 0:
        return
    src, dst = src.to(ks[0].device), dst.to(ks[0].device)
    rows = [buf.index_select(0, src) for buf in (*ks, *vs)]
    for buf, r in zip((*ks, *vs), rows):
        buf.index_copy_(0, dst, r)


def attention_output(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     out: torch.Tensor | None) -> torch.Tensor:
    """Checks the shapes of a selective-attention call (GQA: heads a multiple of kv heads) and returns ``out`` or a
    new ``[n_q, heads, v_head_dim]`` tensor like ``q``."""
    n_q, heads, head_dim = q.shape
    if heads % k_buffer.shape[1] or k_buffer.shape[2] != head_dim:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_buffer.shape)}")
    return q.new_empty((n_q, heads, v_buffer.shape[2])) if out is None else out


def request_queries(q, req_to_token, req_pool_indices, seq_lens, q_req):
    """Per request with queries: (the indices of its queries, its row's slots ``[:seq_len]`` as int64)."""
    if q.shape[0] == 0:
        return
    q_req = q_req.to(q.device, torch.int64)
    for b in torch.unique(q_req).tolist():
        idx = (q_req == b).nonzero().squeeze(1)
        yield idx, req_to_token[int(req_pool_indices[b]), : int(seq_lens[b])].to(torch.int64)


def selective_extend_attention_ref(
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
    """Attention of each query over key rows ``0..q_rows[i]`` (and ``< seq_len``) of its request, fp32 softmax.
    A query that sees no key gets zeros."""
    out = attention_output(q, k_buffer, v_buffer, out)
    group = q.shape[1] // k_buffer.shape[1]
    q_rows = q_rows.to(q.device, torch.int64)
    for idx, slots in request_queries(q, req_to_token, req_pool_indices, seq_lens, q_req):
        seq_len = slots.numel()
        k = k_buffer.index_select(0, slots).float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_buffer.index_select(0, slots).float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q.index_select(0, idx).float(), k) * sm_scale
        if logit_cap > 0:
            s = logit_cap * torch.tanh(s / logit_cap)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_rows.index_select(0, idx)[:, None]
        s = s.masked_fill(~visible[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without visible keys -> 0
        out[idx] = torch.einsum("hqk,khd->qhd", p, v).to(out.dtype)
    return out
