"""Robustness of segment reuse through the real engine: an agent aborted mid-round, ``flush_cache`` mid-run and
segment tables naming evicted segments. (A pool too small for a round, with masters of finished rounds evicted under
pressure, shares the small-pool server of ``test_history.py``.)

After every scenario the server is idle and SGLang's memory identity holds (available + evictable + protected ==
pool size, no live row, no diff slot), and it still serves requests. SGLang's own idle check
(``Scheduler.check_memory``) would crash the scheduler on a leak; the server being alive and answering proves it
stayed green.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tokendance_sgl.runner import _post_generate, flush_cache, run_workload
from tokendance_sgl.workloads import Workload

pytestmark = pytest.mark.engine


def _stats(url):
    r = requests.get(url + "/tokendance/stats", timeout=120)
    r.raise_for_status()
    return r.json()


def _assert_idle_and_healthy(url):
    s = _stats(url)
    assert s["rows"] == 0 and s["diff_slots"] == 0, s
    assert s["available_size"] + s["evictable_size"] + s["protected_size"] == s["max_total_num_tokens"], s
    ok = requests.post(url + "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 2}}, timeout=600)
    assert ok.status_code == 200, ok.text
    return s


def test_agent_aborted_mid_round(server_factory, model_path):
    """Round 1 of 4 agents (long decode); agent 2 is aborted while the round runs: the others finish, its diffs are
    freed, the masters stay while the other rows reference them."""
    url = server_factory("tokendance").base_url
    flush_cache(url)
    w = Workload("ga", 4, 1, seed=7, tokenizer=model_path, private_tokens=(60, 90), task_tokens=(20, 30))
    r0 = run_workload(url, w, max_new_tokens=16, progress=False)  # round 0 only: round 1 is composed below
    w2 = Workload("ga", 4, 2, seed=7, tokenizer=model_path, private_tokens=(60, 90), task_tokens=(20, 30))
    w2.build_round(0)
    reqs = w2.build_round(1, r0.outputs(0))
    payloads = []
    for q in reqs:
        p = q.payload(max_new_tokens=160, ignore_eos=True)
        p["rid"] = f"abort-test-{q.agent}"
        payloads.append(p)
    mid: dict = {}

    def _wait_rows(pred, limit=600.0):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            s = _stats(url)
            if pred(s["rows"]):
                return s
            time.sleep(0.2)
        return s

    def abort_later():  # once the round's four rows are composed (decoding 160 tokens), abort agent 2
        _wait_rows(lambda rows: rows == 4)
        requests.post(url + "/abort_request", json={"rid": "abort-test-2"}, timeout=60)
        mid.update(_wait_rows(lambda rows: rows < 4, limit=60.0))

    t = threading.Thread(target=abort_later)
    t.start()
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda p: requests.post(url + "/generate", json=p, timeout=1800).json(), payloads))
    t.join()
    reasons = [b["meta_info"]["finish_reason"]["type"] for b in bodies]
    assert reasons[2] == "abort", reasons
    assert all(reasons[i] == "length" and len(bodies[i]["output_ids"]) == 160 for i in (0, 1, 3)), reasons
    assert mid["rows"] == 3 and mid["locked"] > 0, mid  # the other rows still hold their masters
    s = _assert_idle_and_healthy(url)
    assert s["master_slots"] > 0 and s["locked"] == 0


def test_flush_mid_run_and_tables_naming_evicted_segments(server_factory, model_path):
    """Rounds 0 and 1 run, the cache is flushed, round 2 names the (now evicted) round-1 segments: every request is
    recomputed normally and its output equals exact prefill."""
    url = server_factory("tokendance").base_url
    exact = server_factory("radix", "--disable-radix-cache").base_url
    flush_cache(url)
    w = Workload("ga", 4, 3, seed=11, tokenizer=model_path, private_tokens=(60, 90), task_tokens=(20, 30))
    outs = None
    for r in range(2):
        reqs = w.build_round(r, outs)
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda q: _post_generate(url, q.payload(max_new_tokens=16), 1800)[0], reqs))
        outs = {q.agent: b["output_ids"] for q, b in zip(reqs, bodies)}
    flush_cache(url)
    before = _stats(url)
    assert before["segments"] == 0 and before["known_ids"] >= 8
    reqs = w.build_round(2, outs)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: _post_generate(url, q.payload(max_new_tokens=16), 1800)[0], reqs))
        ref = list(pool.map(lambda q: _post_generate(exact, {"input_ids": q.input_ids, "sampling_params": {
            "max_new_tokens": 16, "temperature": 0.0}}, 1800)[0], reqs))
    for q, g, e in zip(reqs, got, ref):
        assert g["output_ids"] == e["output_ids"], f"agent {q.agent}"
        assert g["meta_info"]["cached_tokens"] <= q.segments[0][1]  # nothing read from (evicted) masters
    after = _stats(url)
    assert after["reused_tokens"] == before["reused_tokens"]
    _assert_idle_and_healthy(url)
