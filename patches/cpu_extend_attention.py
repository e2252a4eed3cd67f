"""Extend attention of SGLang's CPU backend at a cost proportional to the tokens extended, for every ``--kv-backend``.

Target: ``sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend``
(AROUND).  SGLang's ``torch_native`` backend (the attention backend this plugin runs on CPU) computes the extend of a
request with a cached prefix as causal attention over the WHOLE sequence -- the prefix rows get placeholder queries
whose outputs are dropped -- so extending 40 tokens of a 2500-token row costs a 2500 x 2500 attention per layer.
The GPU backends (FlashInfer, Triton, FA3) attend only from the extended tokens.  On CPU that artifact charges a
cache that leaves little to extend (the reuse backends: a short task text after a long composed row) nearly a full
prefill's attention, and made a round's latency say little about the work it computes.

Here a request with a prefix attends from its extended tokens only, over the keys ``0 .. prefix + t`` of extended
token ``t`` (the same attention, mathematically); a request without a prefix takes SGLang's own call unchanged (the
same SDPA call on the same tensors, so exact prefill is bit for bit what it was).  Encoder/cross attention,
non-causal layers, sliding windows and any batch whose lengths do not add up fall through to SGLang's method.  The
patch runs in every scheduler, whatever ``--kv-backend`` is, so radix and the reuse backends are measured alike.
"""

from __future__ import annotations

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend"


def _supported(encoder_lens, causal, is_cross_attn, sliding_window_size) -> bool:
    windowed = sliding_window_size is not None and sliding_window_size > -1
    return encoder_lens is None and causal and not is_cross_attn and not windowed


def _around_sdpa_forward_extend(original, self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
    def stock():
        return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)

    if not _supported(encoder_lens, causal, is_cross_attn, sliding_window_size):
        return stock()
    # one host read per call (SGLang's loop reads each length per request)
    prefix, extend, kv = extend_prefix_lens.tolist(), extend_seq_lens.tolist(), seq_lens.tolist()
    if not any(prefix) or any(p + e != n for p, e, n in zip(prefix, extend, kv)):
        return stock()
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    q_all = query.movedim(0, query.dim() - 2)  # [heads, tokens, dim]
    start = 0
    for i, (pre, ext, n) in enumerate(zip(prefix, extend, kv)):
        end = start + ext
        slots = req_to_token[req_pool_indices[i], :n]
        k = k_cache[slots].movedim(0, query.dim() - 2)
        v = v_cache[slots].movedim(0, query.dim() - 2)
        q = q_all[:, start:end, :].contiguous()  # laid out as SGLang's query copy
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if pre == 0:  # SGLang's own call: the query covers the whole sequence
            mask, is_causal = None, True
        else:  # extended token t (at row pre + t) sees keys 0 .. pre + t
            rows = torch.arange(pre, n, device=q.device)
            mask, is_causal = torch.arange(n, device=q.device)[None, :] <= rows[:, None], False
        out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                           enable_gqa=enable_gqa, scale=scaling, is_causal=is_causal)
        output[start:end, :, :] = out.squeeze(0).movedim(query.dim() - 2, 0)
        start = end
    return output


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_sdpa_forward_extend, HookType.AROUND)
