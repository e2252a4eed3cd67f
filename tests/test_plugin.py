"""The plugin as SGLang sees it: entry-point discovery, the --kv-backend flag, and the real engine on CPU."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
import requests

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def _keep_server_env():
    """``prepare_server_args`` exports the TokenDance settings to ``os.environ`` (for the processes a server spawns);
    in this process that would leak into every server a later test starts (e.g. a default recompute policy)."""
    import os

    from tokendance_sgl.patches.kv_backend import ENV_BACKEND, ENV_MAX_GAP, ENV_RECOMPUTE

    keys = (ENV_BACKEND, ENV_RECOMPUTE, ENV_MAX_GAP)
    saved = {k: os.environ.pop(k, None) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_plugin_is_discovered_through_its_entry_point():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    ours = [ep for ep in eps if ep.name == "tokendance"]
    assert ours and ours[0].value == "tokendance_sgl.plugin:register"
    from sglang.srt.plugins import load_plugins_by_group

    found = load_plugins_by_group("sglang.srt.plugins")
    assert "tokendance" in found and found["tokendance"][1] == "tokendance-sgl"


def _apply_hooks():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from tokendance_sgl.plugin import register

    load_plugins()
    register()
    register()
    HookRegistry.apply_hooks()
    return HookRegistry


def test_register_is_idempotent_and_hooks_apply(model_path):
    HookRegistry = _apply_hooks()
    assert "sglang.srt.server_args.prepare_server_args" in HookRegistry._patched
    assert "sglang.srt.server_args.ServerArgs.add_cli_args" in HookRegistry._patched
    from sglang.srt import server_args as sa

    args = sa.prepare_server_args(["--model-path", model_path, "--kv-backend", "radix"])
    assert args._tokendance == {"kv_backend": "radix"}
    assert args.radix_cache_backend is None  # radix = stock SGLang caching


@pytest.fixture(scope="module")
def cli(launch_server_cli):
    """The module's two `python -m sglang.launch_server` runs, side by side: --help, and conflicting cache flags."""
    help_, conflicting = launch_server_cli(
        ["--help"], ["--model-path", "unused", "--kv-backend", "radix", "--radix-cache-backend", "flexkv"])
    return {"help": help_, "conflicting": conflicting}


def test_help_shows_kv_backend(cli):
    out = cli["help"]
    assert out.returncode == 0
    assert "--kv-backend {radix,pic,tokendance}" in out.stdout


def test_pic_maps_onto_its_cache_backend(model_path):
    _apply_hooks()
    from sglang.srt import server_args as sa

    args = sa.prepare_server_args(["--model-path", model_path, "--kv-backend", "pic", "--td-recompute",
                                   "deviation:0.15"])
    assert args.radix_cache_backend == "tokendance-pic"
    assert args._tokendance == {"kv_backend": "pic", "recompute": "deviation:0.15"}


def test_max_gap_reaches_the_tree_config_and_is_checked(model_path):
    _apply_hooks()
    from sglang.srt import server_args as sa

    args = sa.prepare_server_args(["--model-path", model_path, "--kv-backend", "tokendance", "--td-max-gap", "0"])
    assert args.radix_cache_backend == "tokendance"
    assert args._tokendance == {"kv_backend": "tokendance", "max_gap": 0}
    from tokendance_sgl.collective_tree import TreeConfig

    assert TreeConfig.from_env({k: v for k, v in args._tokendance.items() if k != "kv_backend"}).max_gap == 0
    for argv, msg in (
        (["--kv-backend", "pic", "--td-max-gap", "8"], "tokendance only"),
        (["--kv-backend", "tokendance", "--td-max-gap", "-1"], ">= 0"),
        (["--td-max-gap", "8"], "needs --kv-backend tokendance"),
    ):
        with pytest.raises(SystemExit, match=msg):
            sa.prepare_server_args(["--model-path", model_path, *argv])


def test_conflicting_cache_flags_are_refused(cli):
    out = cli["conflicting"]
    assert out.returncode != 0 and "do not also pass" in out.stderr


def _chat_prompt(model_path: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return tok.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)


@pytest.mark.engine
def test_launch_server_with_kv_backend_radix_serves_generate(radix_server, model_path):
    r = requests.post(
        radix_server.base_url + "/generate",
        json={"text": _chat_prompt(model_path), "sampling_params": {"max_new_tokens": 16, "temperature": 0}},
        timeout=120,
    )
    r.raise_for_status()
    assert "Paris" in r.json()["text"]
    assert "--kv-backend" in radix_server.argv


_ENGINE_SCRIPT = """
import json, sys
from tokendance_sgl.engine import Engine
engine = Engine(model_path=sys.argv[1], kv_backend="radix", max_total_tokens=4096)
try:
    out = engine.generate(prompt=sys.argv[2], sampling_params={"max_new_tokens": 16, "temperature": 0})
    print("RESULT " + json.dumps({"text": out["text"], "td": engine.server_args._tokendance}))
finally:
    engine.shutdown()
"""


@pytest.mark.engine
def test_plugin_loaded_engine_answers_paris(model_path):
    # In its own process: Engine.shutdown() kills every child of the calling process, which in pytest would
    # include the session's shared servers.
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT, model_path, _chat_prompt(model_path)],
        capture_output=True, text=True, timeout=600,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert "Paris" in out["text"]
    assert out["td"] == {"kv_backend": "radix"}


def test_engine_refuses_unknown_backend_before_starting(model_path):
    from tokendance_sgl.engine import Engine
    from tokendance_sgl.patches.kv_backend import KVBackendError

    with pytest.raises(KVBackendError, match="must be one of radix, pic, tokendance"):
        Engine(model_path=model_path, kv_backend="lmcache")


@pytest.mark.engine
def test_stats_endpoint_reports_the_pool(radix_server):
    r = requests.get(radix_server.base_url + "/tokendance/stats", timeout=60)
    r.raise_for_status()
    s = r.json()
    assert s["kv_backend"] == "radix"
    assert s["max_total_num_tokens"] > 0
    assert s["available_size"] + s["evictable_size"] + s["protected_size"] == s["max_total_num_tokens"]
