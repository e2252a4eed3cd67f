"""``--enable-metrics``: the collective tree's counters are Prometheus gauges on SGLang's own ``/metrics``."""

from __future__ import annotations

import re

import pytest
import requests

from tokendance_sgl.history import HistoryWorkload
from tokendance_sgl.metrics import EXPORTED
from tokendance_sgl.runner import flush_cache, run_workload

pytestmark = pytest.mark.engine


def _scrape(url) -> dict:
    text = requests.get(url + "/metrics", timeout=120).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^tokendance:(\w+)(?:\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_endpoint_exports_the_tokendance_counters(server_factory, model_path):
    url = server_factory("tokendance").base_url  # the shared server runs with --enable-metrics (conftest.py)
    flush_cache(url)
    before = _scrape(url)  # (the shared server's counters are cumulative)
    wl = HistoryWorkload("ga", 3, 2, seed=2, turns=1, tokenizer=model_path, private_tokens=(40, 60),
                         task_tokens=(10, 14))
    run_workload(url, wl, max_new_tokens=24, progress=False, extra_sampling={"ignore_eos": True})
    # one more request: SGLang logs its scheduler stats at this prefill, after every counter above has settled
    ok = requests.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}, timeout=600)
    assert ok.status_code == 200
    got = _scrape(url)
    assert set(EXPORTED) <= set(got), sorted(set(EXPORTED) - set(got))
    stats = requests.get(url + "/tokendance/stats", timeout=120).json()
    for name in ("reused_tokens", "rows_composed", "collect_steps"):  # this workload reused
        assert got[name] > before.get(name, 0), (name, got, before)
    for name in ("reused_tokens", "recomputed_tokens", "rows_composed", "collect_steps", "rollbacks"):
        assert got[name] == stats[name], (name, got[name], stats[name])
    assert got["master_slots"] > 0 and got["diff_slots"] == 0 and got["kv_bytes_per_agent"] == 0  # idle: no rows
