"""Injected failures through the real engine (``TOKENDANCE_TEST_FAULTS``): every step of segment reuse that fails
rolls back, and the request runs as plain prefill.

On the history workload (3 agents x 5 rounds) the server is made to fail, in every request of a round, in the copy
kernel (round 1), right after composition (round 2) and in the pre-pass forward (round 3). Those rounds must
produce radix's outputs token for token (exact prefill), count every rollback in ``/tokendance/stats``, leak
nothing (the scheduler's idle and busy memory checks are on) and lock no segment; round 4, without faults,
reuses the history again.
"""

from __future__ import annotations

import pytest
import requests

from tokendance_sgl.faults import ENV_FAULTS
from tokendance_sgl.history import HistoryWorkload
from tokendance_sgl.runner import flush_cache, run_workload

pytestmark = pytest.mark.engine

N, ROUNDS, MAX_NEW = 3, 5, 16
FAULTS = "copy@1,compose@2,prepass@3"


def _stats(url):
    r = requests.get(url + "/tokendance/stats", timeout=120)
    r.raise_for_status()
    return r.json()


def _run(url, model_path):
    flush_cache(url)
    wl = HistoryWorkload("ga", N, ROUNDS, seed=11, turns=1, tokenizer=model_path, private_tokens=(60, 90),
                         task_tokens=(12, 20))
    res = run_workload(url, wl, max_new_tokens=MAX_NEW, progress=False, extra_sampling={"ignore_eos": True})
    return {(r.round, a.agent): a for r in res.rounds for a in r.agents}


def test_failed_steps_roll_back_and_run_as_plain_prefill(own_server, radix_server, model_path):
    url = own_server("tokendance", env={ENV_FAULTS: FAULTS}).base_url
    stock = _run(radix_server.base_url, model_path)
    before = _stats(url)
    ours = _run(url, model_path)
    s = _stats(url)
    c = {k: s[k] - before[k] for k in ("rollbacks", "prepass_fallbacks", "prepass_aborts", "rows_composed")}
    assert ours.keys() == stock.keys()
    for (rnd, agent), a in ours.items():
        if rnd <= 3:  # nothing reused (rounds 1-3 failed at each step), so exact
            assert a.output_ids == stock[(rnd, agent)].output_ids, (rnd, agent)
    # round 1: the copy kernel fails for every row (and for the collective step); round 2: every composition;
    # round 3: every pre-pass, whose regions are then computed in full
    print(f"fault counters over the run: {c}")
    assert c["rollbacks"] >= 3 * N and c["prepass_fallbacks"] >= N and c["prepass_aborts"] == 0, c
    assert c["rows_composed"] >= N, c  # round 4 composes again ...
    computed = {k: a.prompt_tokens - a.cached_tokens for k, a in ours.items()}
    computed_stock = {k: a.prompt_tokens - a.cached_tokens for k, a in stock.items()}
    last = [(ROUNDS - 1, i) for i in range(N)]
    assert sum(computed[k] for k in last) < 0.7 * sum(computed_stock[k] for k in last)  # ... and reuses the history
    for rnd in (1, 2, 3):
        assert sum(computed[(rnd, i)] for i in range(N)) >= sum(computed_stock[(rnd, i)] for i in range(N)) - N
    assert s["rows"] == 0 and s["available_size"] + s["evictable_size"] + s["protected_size"] == \
        s["max_total_num_tokens"], s
    assert s["locked"] == 0, s
    ok = requests.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}, timeout=600)
    assert ok.status_code == 200
