"""`--kv-backend tokendance` through the real engine on CPU: prefix parity with stock radix, segment registration,
refusals that need the cache's registry, and SGLang's own memory accounting."""

from __future__ import annotations

import random

import pytest
import requests

pytestmark = pytest.mark.engine


def _post(base_url, input_ids, max_new_tokens=6, custom_params=None):
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if custom_params is not None:
        sampling["custom_params"] = custom_params
    r = requests.post(base_url + "/generate", json={"input_ids": input_ids, "sampling_params": sampling}, timeout=300)
    return r


def _multi_turn(base_url, seed=0, sessions=3, turns=3):
    """Sessions that each grow turn by turn (prompt = previous prompt + output + new user text); returns the
    cached_tokens of every request, in order."""
    requests.post(base_url + "/flush_cache", timeout=60).raise_for_status()
    rng = random.Random(seed)
    system = [rng.randrange(200, 40000) for _ in range(40)]  # shared by every session
    histories = [system + [rng.randrange(200, 40000) for _ in range(20)] for _ in range(sessions)]
    cached = []
    for _turn in range(turns):
        for s in range(sessions):
            r = _post(base_url, histories[s])
            r.raise_for_status()
            body = r.json()
            cached.append(body["meta_info"]["cached_tokens"])
            histories[s] = histories[s] + body["output_ids"] + [rng.randrange(200, 40000) for _ in range(12)]
    return cached


def _idle_accounting_holds(base_url):
    s = requests.get(base_url + "/tokendance/stats", timeout=60).json()
    return s, s["available_size"] + s["evictable_size"] + s["protected_size"] == s["max_total_num_tokens"]


@pytest.fixture(scope="module")
def td_server(server_factory):
    return server_factory("tokendance")


def test_multi_turn_prefix_cached_tokens_equal_stock_radix(td_server, radix_server):
    ours = _multi_turn(td_server.base_url)
    stock = _multi_turn(radix_server.base_url)
    assert ours == stock
    assert sum(ours) > 0
    stats, ok = _idle_accounting_holds(td_server.base_url)
    assert stats["cache_class"] == "CollectiveTree"
    assert ok, stats
    assert td_server.alive()


def test_output_with_out_seg_is_registered_and_named_later(td_server):
    base = td_server.base_url
    prompt = [random.Random(7).randrange(200, 40000) for _ in range(30)]
    r = _post(base, prompt, max_new_tokens=8, custom_params={"td_round": 0, "td_agent": 0, "td_out_seg": "t/r0/a0"})
    r.raise_for_status()
    out = r.json()["output_ids"]
    before = requests.get(base + "/tokendance/stats", timeout=60).json()
    assert before["known_ids"] >= 1 and before["segments"] >= 1
    # a later prompt naming that output: accepted
    head = [11, 12, 13]
    later = head + out[:-1] + [14, 15]
    ok = _post(base, later, custom_params={"td_round": 1, "td_agent": 1, "td_seg_ids": ["t/r0/a0"],
                                           "td_seg_starts": [3], "td_seg_ends": [3 + len(out) - 1]})
    assert ok.status_code == 200, ok.text


def test_unknown_segment_id_fails_that_request_alone(td_server):
    base = td_server.base_url
    bad = _post(base, list(range(300, 340)), custom_params={"td_round": 1, "td_seg_ids": ["never/seen"],
                                                            "td_seg_starts": [5], "td_seg_ends": [15]})
    assert bad.status_code == 400, bad.text
    assert "unknown segment id" in bad.text
    good = _post(base, list(range(300, 340)))
    assert good.status_code == 200
    stats, ok = _idle_accounting_holds(base)
    assert ok, stats


def test_server_log_has_no_memory_leak_report(td_server):
    log = td_server.log_path.read_text(errors="replace")
    assert "leak" not in log.lower(), [line for line in log.splitlines() if "leak" in line.lower()][:5]
    assert td_server.alive()
