"""RoPE variants the tokendance backend accepts or refuses, and recompute-policy parsing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokendance_sgl import kernels as K
from tokendance_sgl.rope import UnsupportedRope, check_hf_config, spec_from_module
from tokendance_sgl.selection import RecomputePolicy, parse_policy


def _rope(scaling=None, neox=True):
    from sglang.srt.layers.rotary_embedding import get_rope

    return get_rope(64, 64, 4096, 10000, is_neox_style=neox, rope_scaling=scaling, dtype=torch.float32)


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 2.0},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 1024}],
)
def test_position_linear_rope_spec_rerotates_exactly(scaling):
    """For every accepted variant: K made by SGLang at p, re-rotated with the spec's inv_freq by p' - p, equals K at
    p'."""
    rope = _rope(scaling)
    spec = spec_from_module(rope)
    g = torch.Generator().manual_seed(3)
    n = 24
    k = torch.randn(n, 2 * 64, generator=g)
    q = torch.randn(n, 2 * 64, generator=g)
    p, p2 = torch.randint(0, 1500, (n,), generator=g), torch.randint(0, 1500, (n,), generator=g)
    _, k1 = rope.forward_native(p, q.clone(), k.clone())
    _, k2 = rope.forward_native(p2, q.clone(), k.clone())
    pool = k1.view(n, 2, 64).clone()
    K.rerotate_k_ref([pool], torch.arange(n), p2 - p, **spec.kernel_kwargs())
    torch.testing.assert_close(pool, k2.view(n, 2, 64), atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "scaling,what",
    [({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, "YaRN"),
     ({"rope_type": "dynamic", "factor": 2.0}, "DynamicNTK")],
)
def test_non_linear_rope_modules_are_refused(scaling, what):
    with pytest.raises(UnsupportedRope, match="cannot be re-rotated exactly"):
        spec_from_module(_rope(scaling))


@pytest.mark.parametrize(
    "config",
    [{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     {"rope_scaling": {"type": "default", "mrope_section": [16, 24, 24]}},
     {"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}],
)
def test_hf_configs_with_inexact_rope_are_refused(config):
    with pytest.raises(UnsupportedRope):
        check_hf_config(config, "m")


@pytest.mark.parametrize("config", [{}, {"rope_scaling": None}, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                                    {"rope_scaling": {"type": "linear", "factor": 2.0}}])
def test_hf_configs_with_linear_rope_pass(config):
    check_hf_config(config, "m")


@pytest.fixture(scope="module")
def refused(model_path, tmp_path_factory, launch_server_cli):
    """Two starts the main process refuses before loading anything, side by side: a copy of the default model's
    config with YaRN scaling, and a malformed --td-recompute."""
    model = tmp_path_factory.mktemp("yarn-model")
    for f in Path(model_path).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    (model / "config.json").write_text(json.dumps(cfg))
    yarn, bad_policy = launch_server_cli(
        ["--model-path", str(model), "--kv-backend", "tokendance", "--device", "cpu"],
        ["--model-path", "x", "--kv-backend", "tokendance", "--td-recompute", "sink:-1"])
    return {"yarn": yarn, "bad_policy": bad_policy}


def test_server_refuses_a_yarn_model_at_start(refused):
    proc = refused["yarn"]
    assert proc.returncode != 0
    assert "cannot be re-rotated exactly" in proc.stderr and "yarn" in proc.stderr


def test_bad_td_recompute_flag_is_refused_at_start(refused):
    proc = refused["bad_policy"]
    assert proc.returncode != 0 and "--td-recompute" in proc.stderr and "unknown recompute policy" in proc.stderr


def test_policy_parsing_and_offsets():
    assert parse_policy("full") == RecomputePolicy("full")
    assert parse_policy(" NONE ") == RecomputePolicy("none")
    assert parse_policy("sink:4") == RecomputePolicy("select", 4)
    assert str(parse_policy("sink:4")) == "sink:4"
    assert parse_policy("sink:4").offsets(3).tolist() == [0, 1, 2]
    assert parse_policy("sink:2").offsets(10).tolist() == [0, 1]
    assert parse_policy("none").offsets(10).tolist() == []
    assert parse_policy("full").offsets(3).tolist() == [0, 1, 2]
    assert not parse_policy("full").reuses_masters and parse_policy("none").reuses_masters
    assert not parse_policy("sink:4").needs_scores
    for bad in ("sink", "sink:x", "sink:-1", "half", "", "deviation:0", "deviation:1.5", "deviation:x",
                "deviation:0.1:-1", "sink:1+sink:2", "sink:2+half"):
        with pytest.raises(ValueError, match="unknown recompute policy"):
            parse_policy(bad)


def test_deviation_policies_choose_the_most_deviating_tokens():
    p = parse_policy("deviation:0.25")
    assert p == RecomputePolicy("select", 0, 0.25, 1) and p.needs_scores and str(p) == "deviation:0.25"
    assert parse_policy("deviation:0.2:3").layer == 3 and str(parse_policy("deviation:0.2:3")) == "deviation:0.2:3"
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 4.0, 0.3, 0.4])
    assert p.budget(8) == 2 and p.choose(8, scores).tolist() == [1, 5]
    combo = parse_policy("sink:2+deviation:0.25")
    assert str(combo) == "sink:2+deviation:0.25" and combo.budget(8) == 4
    # the sink tokens are chosen anyway; the deviation part picks the top of the rest
    assert combo.choose(8, scores).tolist() == [0, 1, 3, 5]
    assert combo.offsets(8).tolist() == [0, 1]
    assert parse_policy("deviation:1").choose(5, torch.arange(5.0)).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs 8 deviation scores"):
        p.choose(8, None)


def test_deviation_scores_and_page_rounding():
    from tokendance_sgl.selection import by_page, deviation_scores

    k = torch.ones(4, 2, 8)
    v = torch.ones(4, 2, 8)
    k2, v2 = k.clone(), v.clone()
    k2[2] += 1.0
    v2[0] += 0.5
    s = deviation_scores(k2, v2, k, v)
    assert s[1] == 0 and s[3] == 0 and s[2] > s[0] > 0
    # a run of 12 tokens from row 14, pages of 4 rows (offsets 0-1 | 2-5 | 6-9 | 10-11); offset 0 is a sink token
    scores = np.array([-np.inf, 5, 0, 4, 0, 0, 3, 3, 3, 3, 0, 0], dtype=np.float32)
    assert by_page(scores, 4, 14, 4).tolist() == [6, 7, 8, 9]  # one page (total 12) instead of offsets 1, 3, 6, 7
    assert by_page(scores, 5, 14, 4).tolist() == [1, 6, 7, 8, 9]  # then the best token of the next page
    p = parse_policy("sink:1+deviation:0.34")  # budget 1 + ceil(0.34 * 12) - ... = 5 tokens
    token_wise, paged = p.choose(12, scores), p.choose(12, scores, pages=(14, 4))
    assert token_wise.size == paged.size == p.budget(12)
    pages_of = lambda off: len(set(((14 + off) // 4).tolist()))  # noqa: E731
    assert pages_of(paged) < pages_of(token_wise), (token_wise, paged)
