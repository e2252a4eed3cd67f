"""Every SGLang mode segment reuse does not support is refused at start-up with a message naming the flag (or the
model property), for tokendance and pic; no model is loaded. On a CUDA server the overlap scheduler and the prefill
CUDA graph are turned off."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import tokendance_sgl  # noqa: F401
from sglang.srt.server_args import ServerArgs

from tokendance_sgl.patches.kv_backend import KVBackendError, TokenDanceSettings, check_model, check_modes
from tokendance_sgl.selection import parse_policy
from tokendance_sgl.support import gpu_defaults, model_refusals, refusals

REFUSED = [
    ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm"),
    ({"enable_two_batch_overlap": True}, "--enable-two-batch-overlap"),
    ({"enable_single_batch_overlap": True}, "--enable-single-batch-overlap"),
    ({"attention_backend": "torch_native", "prefill_attention_backend": "triton"}, "--prefill-attention-backend"),
    ({"attention_backend": "torch_native", "decode_attention_backend": "triton"}, "--decode-attention-backend"),
    ({"kv_cache_dtype": "fp8_e4m3"}, "--kv-cache-dtype"),
    ({"enable_dp_attention": True}, "--enable-dp-attention"),
    ({"pp_size": 2}, "--pp-size"),
    ({"disaggregation_mode": "prefill"}, "--disaggregation-mode"),
    ({"dllm_algorithm": "LowConfidence"}, "--dllm-algorithm"),
]


@pytest.mark.parametrize("backend", ["tokendance", "pic"])
@pytest.mark.parametrize("fields,flag", REFUSED, ids=[f for _, f in REFUSED])
def test_refused_flag_is_named(fields, flag, backend):
    args = ServerArgs(model_path="/nonexistent", **fields)
    got = refusals(args, backend, parse_policy("sink:4"))
    assert len(got) == 1 and got[0].startswith(flag), got
    with pytest.raises(KVBackendError, match=flag):
        check_modes(TokenDanceSettings(kv_backend=backend, recompute="sink:4"), args)


def test_supported_configuration_passes():
    args = ServerArgs(model_path="/nonexistent", attention_backend="torch_native", tp_size=2)
    assert refusals(args, "tokendance", parse_policy("sink:4")) == []  # TP works with a static policy
    for ps in (4, 16):  # pages: copy-on-write diffs
        assert refusals(ServerArgs(model_path="/x", page_size=ps), "tokendance", parse_policy("deviation:0.15")) == []
    check_modes(TokenDanceSettings(kv_backend="radix"), ServerArgs(model_path="/x", page_size=16))  # radix: stock


def test_tp_with_deviation_is_refused():
    args = ServerArgs(model_path="/nonexistent", tp_size=2)
    (msg,) = refusals(args, "tokendance", parse_policy("sink:2+deviation:0.1"))
    assert "--tp-size 2" in msg and "deviation" in msg


def test_model_properties_are_refused(tmp_path):
    from transformers import LlamaConfig, MistralConfig

    assert model_refusals(LlamaConfig()) == []
    (msg,) = model_refusals(MistralConfig(sliding_window=4096), "m")
    assert "sliding_window=4096" in msg
    (msg,) = model_refusals(SimpleNamespace(kv_lora_rank=512), "ds")
    assert "MLA" in msg
    d = tmp_path / "mistral"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MistralConfig(sliding_window=4096).to_dict()))
    with pytest.raises(KVBackendError, match="sliding-window"):
        check_model("pic", str(d))
    check_model("radix", str(d))  # only the reuse backends refuse it


def test_gpu_defaults_turn_off_overlap_and_the_prefill_graph():
    gpu = SimpleNamespace(device="cuda", disable_overlap_schedule=False, cuda_graph_backend_prefill=None)
    changed = gpu_defaults(gpu)
    assert gpu.disable_overlap_schedule and gpu.cuda_graph_backend_prefill == "disabled" and len(changed) == 2
    assert gpu_defaults(gpu) == []  # already off
    cpu = SimpleNamespace(device="cpu", disable_overlap_schedule=False, cuda_graph_backend_prefill=None)
    assert gpu_defaults(cpu) == [] and not cpu.disable_overlap_schedule


def test_fault_injection_spec_is_checked_at_start_up(monkeypatch):
    from tokendance_sgl.config import TreeConfig
    from tokendance_sgl.faults import ENV_FAULTS, Faults, InjectedFault

    faults = Faults.parse("copy@1, prepass@3,prepass@4")
    faults.check("copy", 0)
    faults.check("compose", 1)
    with pytest.raises(InjectedFault, match="prepass failure in round 4"):
        faults.check("prepass", 4)
    Faults.parse("").check("copy", 1)  # unset: nothing injected
    monkeypatch.setenv(ENV_FAULTS, "kernel@1")
    with pytest.raises(ValueError, match=f"{ENV_FAULTS}: 'kernel@1' is not SITE@ROUND"):
        TreeConfig.from_env()
