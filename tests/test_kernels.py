"""Kernels: Triton (run by the interpreter on CPU) against the torch references, and the references against SGLang.

TRITON_INTERPRET=1 is set before the Triton kernel modules are first imported (the package imports triton lazily), and
they are reloaded if something imported them compiled earlier in this process. The variable is then restored, so it
does not leak into the rest of the test session (servers started later would inherit it). Works whether or not triton
itself was imported before (the kernels use no triton standard-library jit helpers that the interpreter cannot run).
"""

from __future__ import annotations

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tokendance_sgl.kernels as K  # noqa: E402


def _load_interpreted_modules() -> dict[str, object]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    mods = {}
    for name in K.TRITON_MODULES:  # kv_copy first: rope imports from it
        mod = importlib.import_module(f"{K.__name__}.{name}")
        if any(isinstance(v, JITFunction) for v in vars(mod).values()):
            mod = importlib.reload(mod)
        assert any(isinstance(v, InterpretedFunction) for v in vars(mod).values()), name
        mods[name] = mod
    # One launch while the variable is set, so triton's lazy imports happen in interpreter mode.
    K.rerotate_k_triton([torch.zeros(2, 1, 2)], torch.tensor([1]), torch.tensor([1]), rope_theta=1e4, rotary_dim=2)
    return mods


MODS = _load_interpreted_modules()
if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


class LaunchCounter:
    """Wraps a kernel object: counts ``kernel[grid](...)`` launches and records the grids."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids: list[tuple] = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _pool(layers: int, rows: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, dim, generator=g).to(dtype) for _ in range(layers)]


def _clone(bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b.clone() for b in bufs]


def _assert_bufs_close(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), **TOL[dtype])


def _slots(rows: int, n: int, seed: int, strided: bool) -> torch.Tensor:
    """Unsorted distinct rows; a non-contiguous view when ``strided``."""
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return perm[: 2 * n : 2] if strided else perm[:n].clone()


# ---- rerotate_k -------------------------------------------------------------------------------------------------

ROPE_SHAPES = [(64, 64, 3), (80, 32, 1), (128, 64, 8)]  # (head_dim, rotary_dim, kv_heads)


@pytest.mark.parametrize("head_dim,rotary_dim,kv_heads", ROPE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rerotate_k_triton_matches_reference(head_dim, rotary_dim, kv_heads, dtype, is_neox, monkeypatch):
    layers, rows, n = 3, 48, 19
    bufs = _pool(layers, rows, kv_heads, head_dim, dtype, seed=head_dim + kv_heads)
    before, ref = _clone(bufs), _clone(bufs)
    slots = _slots(rows, n, seed=1, strided=is_neox)
    delta = torch.randint(-500, 500, (n,), generator=torch.Generator().manual_seed(2))
    delta[0] = 0
    counter = LaunchCounter(MODS["rope"]._rerotate_kernel)
    monkeypatch.setattr(MODS["rope"], "_rerotate_kernel", counter)

    K.rerotate_k_triton(bufs, slots, delta, rope_theta=1e4, rotary_dim=rotary_dim, is_neox=is_neox)
    K.rerotate_k_ref(ref, slots, delta, rope_theta=1e4, rotary_dim=rotary_dim, is_neox=is_neox)

    assert len(counter.grids) == 1  # all layers, one launch
    _assert_bufs_close(bufs, ref, dtype)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[slots] = False
    for b, b0 in zip(bufs, before):
        assert torch.equal(b[untouched], b0[untouched])
        assert torch.equal(b[:, :, rotary_dim:], b0[:, :, rotary_dim:])
        assert torch.equal(b[slots[0]], b0[slots[0]])  # delta 0
        assert (b[slots[1:], :, :rotary_dim].float() - b0[slots[1:], :, :rotary_dim].float()).abs().max() > 0.1


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rerotate_plus_then_minus_restores(impl, is_neox):
    fn = K.rerotate_k_triton if impl == "triton" else K.rerotate_k_ref
    bufs = _pool(2, 32, 2, 64, torch.float32, seed=5)
    before = _clone(bufs)
    slots = _slots(32, 12, seed=6, strided=False)
    delta = torch.randint(-3000, 3000, (12,), generator=torch.Generator().manual_seed(7))
    fn(bufs, slots, delta, rope_theta=1e5, rotary_dim=48, is_neox=is_neox)
    fn(bufs, slots, -delta, rope_theta=1e5, rotary_dim=48, is_neox=is_neox)
    _assert_bufs_close(bufs, before, torch.float32)


def test_rerotate_composes_with_sglang_rotary_embedding(model_path):
    """K made by SGLang's RotaryEmbedding at p, re-rotated by p' - p, equals K made at p' (SmolLM2's RoPE config)."""
    from sglang.srt.layers.rotary_embedding import get_rope

    cfg = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    kv_heads, heads = cfg["num_key_value_heads"], cfg["num_attention_heads"]
    assert (head_dim, theta) == (64, 1e5)
    g = torch.Generator().manual_seed(11)
    n = 40
    k = torch.randn(n, kv_heads * head_dim, generator=g)
    q = torch.randn(n, heads * head_dim, generator=g)
    p = torch.randint(0, 300, (n,), generator=g)
    p2 = torch.randint(0, 300, (n,), generator=g)
    for is_neox in (True, False):
        rope = get_rope(head_dim, head_dim, 8192, int(theta), is_neox_style=is_neox, dtype=torch.float32)
        _, k_at_p = rope.forward_native(p, q.clone(), k.clone())
        _, k_at_p2 = rope.forward_native(p2, q.clone(), k.clone())
        expected = k_at_p2.view(n, kv_heads, head_dim)
        slots = _slots(64, n, seed=12, strided=False)
        for fn in (K.rerotate_k_ref, K.rerotate_k_triton):
            pool = torch.zeros(64, kv_heads, head_dim)
            pool[slots] = k_at_p.view(n, kv_heads, head_dim)
            fn([pool], slots, p2 - p, rope_theta=theta, rotary_dim=head_dim, is_neox=is_neox)
            scale = expected.abs().max().item()
            torch.testing.assert_close(pool[slots], expected, atol=1.5e-5 * scale, rtol=0)
        # a wrong pairing would not match
        pool = torch.zeros(64, kv_heads, head_dim)
        pool[slots] = k_at_p.view(n, kv_heads, head_dim)
        K.rerotate_k_ref([pool], slots, p2 - p, rope_theta=theta, rotary_dim=head_dim, is_neox=not is_neox)
        assert (pool[slots] - expected).abs().max() > 0.1


def test_rerotate_with_layers_as_views_of_one_allocation():
    """Stacked 4-D input and layer offsets that are not multiples of 16 elements (the table's unit-1 path)."""
    stacked = torch.randn(3, 7, 1, 6)  # 42 elements per layer
    before, ref = stacked.clone(), stacked.clone()
    slots, delta = torch.tensor([5, 0, 3]), torch.tensor([-7, 100, 1])
    K.rerotate_k_triton(stacked, slots, delta, rope_theta=1e4, rotary_dim=4)
    K.rerotate_k_ref(ref, slots, delta, rope_theta=1e4, rotary_dim=4)
    torch.testing.assert_close(stacked, ref, **TOL[torch.float32])
    assert (stacked - before)[:, slots, :, :4].abs().amin(dim=(1, 2, 3)).gt(0).all()  # every layer rotated
    from tokendance_sgl.kernels._common import layer_set

    assert layer_set(stacked, "k").unit == 1
    assert layer_set([torch.zeros(4, 2, 64) for _ in range(3)], "k").unit == 16


def test_scaled_inv_freq_override():
    """An explicit inv_freq (e.g. linear scaling by 4) equals rotating by delta / 4 with the plain frequencies."""
    bufs = _pool(1, 16, 2, 32, torch.float32, seed=21)
    ref = _clone(bufs)
    slots, delta = torch.tensor([3, 9]), torch.tensor([40, -12])
    inv = K.rope_inv_freq(1e4, 32) / 4
    K.rerotate_k_triton(bufs, slots, delta, rope_theta=1e4, rotary_dim=32, inv_freq=inv)
    ref_inv = K.rope_inv_freq(1e4, 32)
    K.rerotate_k_ref(ref, slots, delta // 4, rope_theta=1e4, rotary_dim=32, inv_freq=ref_inv)
    _assert_bufs_close(bufs, ref, torch.float32)


# ---- copies -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,rotary_dim,kv_heads", ROPE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_rerotate_k_triton_matches_reference(head_dim, rotary_dim, kv_heads, dtype, monkeypatch):
    layers, rows, n = 2, 64, 21
    v_dim = 48 if head_dim == 80 else head_dim  # V may have its own head dim
    ks = _pool(layers, rows, kv_heads, head_dim, dtype, seed=31)
    vs = _pool(layers, rows, kv_heads, v_dim, dtype, seed=32)
    ks_ref, vs_ref = _clone(ks), _clone(vs)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(33))
    src, dst = perm[:n], perm[n : 2 * n]
    delta = torch.randint(-2000, 2000, (n,), generator=torch.Generator().manual_seed(34))
    counters = {m: LaunchCounter(getattr(MODS[m], k)) for m, k in (("rope", "_rerotate_kernel"),
                                                                   ("kv_copy", "_copy_kv_kernel"))}
    monkeypatch.setattr(MODS["rope"], "_rerotate_kernel", counters["rope"])
    monkeypatch.setattr(MODS["kv_copy"], "_copy_kv_kernel", counters["kv_copy"])

    K.copy_rerotate_k_triton(ks, vs, src, dst, delta, rope_theta=1e5, rotary_dim=rotary_dim, is_neox=True)
    K.copy_rerotate_k_ref(ks_ref, vs_ref, src, dst, delta, rope_theta=1e5, rotary_dim=rotary_dim, is_neox=True)

    assert [len(c.grids) for c in counters.values()] == [1, 1]
    _assert_bufs_close(ks + vs, ks_ref + vs_ref, dtype)
    for k0, k1 in zip(_pool(layers, rows, kv_heads, head_dim, dtype, seed=31), ks):
        assert torch.equal(k1[src], k0[src])  # sources untouched
        assert torch.equal(k1[dst][..., rotary_dim:], k0[src][..., rotary_dim:])  # tail copied exactly
    for v0, v1 in zip(_pool(layers, rows, kv_heads, v_dim, dtype, seed=32), vs):
        assert torch.equal(v1[dst], v0[src])


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_kv_slots_triton_matches_reference(stacked, dtype):
    layers, rows, heads, dim = 3, 40, 3, 80
    ks = _pool(layers, rows, heads, dim, dtype, seed=41)
    vs = _pool(layers, rows, heads, dim, dtype, seed=42)
    if stacked:
        ks, vs = torch.stack(ks), torch.stack(vs)
        ks_ref, vs_ref = ks.clone(), vs.clone()
    else:
        ks_ref, vs_ref = _clone(ks), _clone(vs)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(43))
    src, dst = perm[:26:2], perm[27:]  # src non-contiguous
    K.copy_kv_slots_triton(ks, vs, src, dst)
    K.copy_kv_slots_ref(ks_ref, vs_ref, src, dst)
    for a, b in zip([*ks, *vs], [*ks_ref, *vs_ref]):
        assert torch.equal(a, b)
    for a in [*ks, *vs]:
        assert torch.equal(a[dst], a[src])


def test_empty_inputs_are_no_ops():
    ks, vs = _pool(2, 8, 1, 64, torch.float32, seed=51), _pool(2, 8, 1, 64, torch.float32, seed=52)
    before = _clone(ks + vs)
    empty = torch.empty(0, dtype=torch.int64)
    for fn in (K.rerotate_k_triton, K.rerotate_k_ref):
        fn(ks, empty, empty, rope_theta=1e4, rotary_dim=64)
    for fn in (K.copy_rerotate_k_triton, K.copy_rerotate_k_ref):
        fn(ks, vs, empty, empty, empty, rope_theta=1e4, rotary_dim=64)
    for fn in (K.copy_kv_slots_triton, K.copy_kv_slots_ref):
        fn(ks, vs, empty, empty)
    for a, b in zip(ks + vs, before):
        assert torch.equal(a, b)
    q = torch.empty(0, 4, 64)
    r2t = torch.zeros(2, 8, dtype=torch.int32)
    for fn in (K.selective_extend_attention_triton, K.selective_extend_attention_ref, K.selective_extend_attention_cpu):
        out = fn(q, ks[0], vs[0], r2t, torch.tensor([1]), torch.tensor([8]), empty, empty, sm_scale=0.125)
        assert out.shape == (0, 4, 64)


def test_layer_mismatch_and_bad_arguments_raise():
    ks = [torch.zeros(8, 1, 64), torch.zeros(9, 1, 64)]
    idx = torch.tensor([1])
    for fn in (K.rerotate_k_triton, K.rerotate_k_ref):
        with pytest.raises(ValueError):
            fn(ks, idx, idx, rope_theta=1e4, rotary_dim=64)
        with pytest.raises(ValueError):
            fn(ks[:1], idx, idx, rope_theta=1e4, rotary_dim=63)
    with pytest.raises(ValueError):
        K.copy_kv_slots_triton(ks[:1], ks[1:], idx, idx)


# ---- dispatch ---------------------------------------------------------------------------------------------------


def test_dispatch_cpu_uses_reference_unless_forced(monkeypatch):
    counter = LaunchCounter(MODS["rope"]._rerotate_kernel)
    monkeypatch.setattr(MODS["rope"], "_rerotate_kernel", counter)
    bufs = _pool(2, 8, 1, 16, torch.float32, seed=61)
    args = (bufs, torch.tensor([2]), torch.tensor([3]))
    monkeypatch.delenv("TOKENDANCE_KERNEL_BACKEND", raising=False)
    K.rerotate_k(*args, rope_theta=1e4, rotary_dim=16)
    assert counter.grids == []
    monkeypatch.setenv("TOKENDANCE_KERNEL_BACKEND", "triton")
    K.rerotate_k(*args, rope_theta=1e4, rotary_dim=16)
    assert len(counter.grids) == 1
    monkeypatch.setenv("TOKENDANCE_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError):
        K.rerotate_k(*args, rope_theta=1e4, rotary_dim=16)


def test_package_imports_without_triton_or_sglang():
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "kernels_only", {str(REPO / "kernels" / "__init__.py")!r},
            submodule_search_locations=[{str(REPO / "kernels")!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["kernels_only"] = mod; spec.loader.exec_module(mod)
        bad = [m for m in ("triton", "sglang", "tokendance_sgl.kernels") if m in sys.modules]
        assert not bad, bad
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd="/")


# ---- selective_extend_attention -----------------------------------------------------------------------------------


def _attention_case(head_dim: int, v_dim: int, kv_heads: int, group: int, dtype: torch.dtype, seed: int):
    """Three requests of different lengths scattered over a shuffled pool and over req_to_token rows."""
    g = torch.Generator().manual_seed(seed)
    lens = [23, 70, 5]
    pool_rows = 128
    kb = torch.randn(pool_rows, kv_heads, head_dim, generator=g).to(dtype)
    vb = torch.randn(pool_rows, kv_heads, v_dim, generator=g).to(dtype)
    req_to_token = torch.zeros(6, 96, dtype=torch.int32)
    req_pool_indices = torch.tensor([4, 1, 2])
    perm = torch.randperm(pool_rows, generator=g)
    off = 0
    for b, n in enumerate(lens):
        req_to_token[req_pool_indices[b], :n] = perm[off : off + n].to(torch.int32)
        off += n
    seq_lens = torch.tensor(lens)
    q_req, q_rows = [], []
    for b, n in enumerate(lens):
        rows = torch.randperm(n, generator=g)[: max(1, n // 2)]
        q_req += [b] * len(rows)
        q_rows += rows.tolist()
    order = torch.randperm(len(q_req), generator=g)
    q_req, q_rows = torch.tensor(q_req)[order], torch.tensor(q_rows)[order]
    q = torch.randn(len(q_req), kv_heads * group, head_dim, generator=g).to(dtype)
    return q, kb, vb, req_to_token, req_pool_indices, seq_lens, q_req, q_rows


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_selective_attention_matches_reference(impl, head_dim, group, dtype):
    """Triton (interpreted here) and the CPU path (fused SDPA; a soft cap runs the reference) against the oracle."""
    kv_heads = 2 if group < 8 else 1
    v_dim = 48 if head_dim == 80 else head_dim
    logit_cap = 5.0 if group == 3 else 0.0
    args = _attention_case(head_dim, v_dim, kv_heads, group, dtype, seed=head_dim * 10 + group)
    scale = 1 / math.sqrt(head_dim)
    tuning = {"block_m": 16, "block_n": 16} if impl == "triton" else {}
    out = getattr(K, f"selective_extend_attention_{impl}")(*args, sm_scale=scale, logit_cap=logit_cap, **tuning)
    ref = K.selective_extend_attention_ref(*args, sm_scale=scale, logit_cap=logit_cap)
    assert out.shape == (args[0].shape[0], kv_heads * group, v_dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_selective_attention_dispatch_on_cpu(monkeypatch):
    """auto on CPU tensors runs the SDPA path, ``torch`` the reference, ``triton`` Triton."""
    args = _attention_case(64, 64, 2, 3, torch.float32, seed=77)
    called = []
    for name in ("selective_extend_attention_cpu", "selective_extend_attention_ref", "selective_extend_attention_triton"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _n=name, _f=real, **kw: called.append(_n) or _f(*a, **kw))
    for env, want in (("auto", "selective_extend_attention_cpu"), ("torch", "selective_extend_attention_ref"),
                      ("triton", "selective_extend_attention_triton")):
        monkeypatch.setenv("TOKENDANCE_KERNEL_BACKEND", env)
        called.clear()
        K.selective_extend_attention(*args, sm_scale=0.125)
        assert called == [want], (env, called)


def test_selective_attention_non_contiguous_queries_and_plan_reuse():
    q, kb, vb, r2t, rpi, sl, q_req, q_rows = _attention_case(64, 64, 2, 3, torch.float32, seed=71)
    q_strided = torch.stack([q, torch.zeros_like(q)], dim=-1)[..., 0]  # same values, last-dim stride 2
    assert torch.equal(q_strided, q) and not q_strided.is_contiguous()
    plan = K.plan_selective_attention(q_req, q_rows, rpi.numel(), block_m=16)
    ref = K.selective_extend_attention_ref(q, kb, vb, r2t, rpi, sl, q_req, q_rows, sm_scale=0.125)
    for layer_k in (kb, kb.flip(0)):  # two "layers" sharing one plan
        want = K.selective_extend_attention_ref(q, layer_k, vb, r2t, rpi, sl, q_req, q_rows, sm_scale=0.125)
        got = K.selective_extend_attention_triton(q_strided, layer_k, vb, r2t, rpi, sl, q_req, q_rows,
                                                  sm_scale=0.125, plan=plan, block_n=16)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert not torch.allclose(want, ref)


def test_dispatcher_plans_once_per_forward(monkeypatch):
    """The plan the pre-pass builds at its first layer and passes to every layer: the default block size on the
    Triton path (the result equals the torch reference), none on the torch path."""
    q, kb, vb, r2t, rpi, sl, q_req, q_rows = _attention_case(64, 64, 2, 3, torch.float32, seed=73)
    ref = K.selective_extend_attention_ref(q, kb, vb, r2t, rpi, sl, q_req, q_rows, sm_scale=0.125)
    monkeypatch.setenv("TOKENDANCE_KERNEL_BACKEND", "torch")
    assert K.plan_selective_extend_attention(q, q_req, q_rows, rpi.numel()) is None
    monkeypatch.setenv("TOKENDANCE_KERNEL_BACKEND", "triton")
    plan = K.plan_selective_extend_attention(q, q_req, q_rows, rpi.numel())
    assert plan is not None and plan.n_q == q.shape[0] and plan.batch == rpi.numel()
    for _layer in range(2):
        got = K.selective_extend_attention(q, kb, vb, r2t, rpi, sl, q_req, q_rows, sm_scale=0.125, plan=plan)
        torch.testing.assert_close(got, ref, **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["triton", "ref", "cpu"])
@pytest.mark.parametrize("group", [1, 3])
def test_selective_attention_on_all_rows_equals_causal_sdpa(impl, group):
    fn = getattr(K, f"selective_extend_attention_{impl}")
    g = torch.Generator().manual_seed(81 + group)
    n, kv_heads, d = 45, 2, 64
    heads = kv_heads * group
    kb = torch.randn(100, kv_heads, d, generator=g)
    vb = torch.randn(100, kv_heads, d, generator=g)
    slots = torch.randperm(100, generator=g)[:n]
    r2t = torch.zeros(3, 64, dtype=torch.int32)
    r2t[2, :n] = slots.to(torch.int32)
    q = torch.randn(n, heads, d, generator=g)
    out = fn(q, kb, vb, r2t, torch.tensor([2]), torch.tensor([n]), torch.zeros(n, dtype=torch.long),
             torch.arange(n), sm_scale=d**-0.5, **({"block_m": 16, "block_n": 16} if impl == "triton" else {}))
    k = kb[slots].repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, n, d]
    v = vb[slots].repeat_interleave(group, dim=1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


# ---- GPU code path without a GPU --------------------------------------------------------------------------------


def test_kernels_compile_for_sm90_with_vectorized_memory_access():
    """Compile the real launch specs for sm_90 (triton's bundled ptxas; no GPU needed), in a fresh process without
    the interpreter: no spills worth mentioning, and bf16 data moved in 16-byte vectors (no 2-byte scalar accesses)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    code = textwrap.dedent(
        """
        import json, torch
        from tokendance_sgl.kernels import aot, rope, kv_copy, selective_attention as sa
        kb = torch.empty(4, 64, 3, 64, dtype=torch.bfloat16); vb = torch.empty_like(kb)
        idx = torch.arange(8); out = []
        for neox in (True, False):
            out.append(aot.compile_spec(rope.rerotate_spec(kb, idx, idx, idx, rope_theta=1e5, rotary_dim=64,
                                                           is_neox=neox)))
        out.append(aot.compile_spec(kv_copy.copy_kv_spec(kb, vb, idx, idx + 8)))
        q = torch.empty(8, 9, 64, dtype=torch.bfloat16)
        spec = sa.selective_attention_spec(q, kb[0], vb[0], torch.zeros(2, 64, dtype=torch.int32), torch.arange(1),
                                           torch.tensor([8]), torch.zeros(8, dtype=torch.long), idx,
                                           torch.empty_like(q), sm_scale=0.125, block_m=128, block_n=64,
                                           num_warps=4, num_stages=1)
        out.append(aot.compile_spec(spec))
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    for r in reports:
        assert r.get("spill_bytes", 0) <= 64, r
    for r in reports:
        widths = r["global_mem_ops_by_bytes"]
        assert "2" not in widths and widths.get("16", 0) >= 4, r
