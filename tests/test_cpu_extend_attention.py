"""``patches/cpu_extend_attention``: the CPU backend's extend attention from the extended tokens only, against
SGLang's own ``TorchNativeAttnBackend._run_sdpa_forward_extend`` (which attends from the whole sequence)."""

from __future__ import annotations

import inspect

import pytest
import torch

from tokendance_sgl.patches.cpu_extend_attention import _around_sdpa_forward_extend

HEADS, KV_HEADS, DIM = 6, 2, 16


def _stock():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return inspect.unwrap(TorchNativeAttnBackend._run_sdpa_forward_extend)  # SGLang's method, not a hooked one


def _backend():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return object.__new__(TorchNativeAttnBackend)  # the method reads no state of an initialized backend


def _batch(prefix: list[int], extend: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = [p + e for p, e in zip(prefix, extend)]
    pool = sum(seq) + 8
    k_cache = torch.randn(pool, KV_HEADS, DIM, generator=g)
    v_cache = torch.randn(pool, KV_HEADS, DIM, generator=g)
    req_to_token = torch.zeros(len(seq) + 2, max(seq), dtype=torch.int64)
    perm = torch.randperm(pool, generator=g)[: sum(seq)]  # scattered slots, as a pool hands them out
    req_pool_indices = torch.tensor(list(range(1, len(seq) + 1)))
    off = 0
    for i, n in enumerate(seq):
        req_to_token[i + 1, :n] = perm[off : off + n]
        off += n
    query = torch.randn(sum(extend), HEADS, DIM, generator=g)
    return (query, k_cache, v_cache, req_to_token, req_pool_indices, torch.tensor(seq), torch.tensor(prefix),
            torch.tensor(extend))


def _run(fn, batch, **kw):
    query, k_cache, v_cache, rtt, idx, seq, prefix, extend = batch
    out = torch.zeros_like(query)
    args = (query, out, k_cache, v_cache, rtt, idx, seq, prefix, extend)
    kw = {"scaling": DIM ** -0.5, "enable_gqa": True, "causal": True, **kw}
    if fn is _around_sdpa_forward_extend:
        return fn(_stock(), _backend(), *args, **kw)
    return fn(_backend(), *args, **kw)


@pytest.mark.parametrize("prefix,extend", [([0], [9]), ([30], [5]), ([0, 41, 7], [12, 3, 20]), ([63], [1])])
def test_equals_sglangs_extend_attention(prefix, extend):
    batch = _batch(prefix, extend)
    ours, theirs = _run(_around_sdpa_forward_extend, batch), _run(_stock(), batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for i, p in enumerate(prefix):  # a request without a prefix is SGLang's own call, bit for bit
        if p == 0:
            a = sum(extend[:i])
            assert torch.equal(ours[a : a + extend[i]], theirs[a : a + extend[i]])


def test_attends_from_the_extended_tokens_only(monkeypatch):
    """The point of the patch: query rows = extended tokens, not the whole sequence."""
    import torch.nn.functional as F

    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    _run(_around_sdpa_forward_extend, _batch([100, 0], [4, 6]))
    assert shapes == [(4, 104), (6, 6)]


@pytest.mark.parametrize("kw", [{"causal": False}, {"sliding_window_size": 8}, {"is_cross_attn": True}])
def test_other_attention_kinds_take_sglangs_path(kw, monkeypatch):
    calls = []
    stock = _stock()

    def original(*a, **k):
        calls.append(k)
        return stock(*a, **k)

    batch = _batch([20], [5])
    query, k_cache, v_cache, rtt, idx, seq, prefix, extend = batch
    _around_sdpa_forward_extend(original, _backend(), query, torch.zeros_like(query), k_cache, v_cache, rtt, idx, seq,
                                prefix, extend, scaling=DIM ** -0.5, enable_gqa=True,
                                **{"causal": True, **kw})
    assert len(calls) == 1
