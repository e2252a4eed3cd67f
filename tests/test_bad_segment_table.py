"""A malformed segment table fails that request alone with HTTP 400; the server keeps serving."""

from __future__ import annotations

import pytest
import requests

PROMPT = list(range(100, 160))

BAD_TABLES = [
    ({"td_seg_ids": ["a"], "td_seg_starts": [5]}, "go together"),
    ({"td_seg_ids": ["a"], "td_seg_starts": ["5"], "td_seg_ends": [9]}, "must be an int"),
    ({"td_seg_ids": ["a", "b"], "td_seg_starts": [10, 5], "td_seg_ends": [20, 8]}, "unsorted or overlaps"),
    ({"td_seg_ids": ["a", "b"], "td_seg_starts": [5, 10], "td_seg_ends": [12, 20]}, "unsorted or overlaps"),
    ({"td_seg_ids": ["a"], "td_seg_starts": [50], "td_seg_ends": [61]}, "outside the prompt"),
    ({"td_seg_ids": ["a"], "td_seg_starts": [9], "td_seg_ends": [9]}, "must be greater"),
    ({"td_round": -1}, "td_round"),
    ({"td_segids": ["a"]}, "unknown TokenDance key"),
]


def _generate(base_url, custom_params):
    return requests.post(
        base_url + "/generate",
        json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0, "custom_params": custom_params}},
        timeout=120,
    )


@pytest.mark.engine
@pytest.mark.parametrize("table,message", BAD_TABLES)
def test_malformed_table_is_rejected_with_400(radix_server, table, message):
    r = _generate(radix_server.base_url, table)
    assert r.status_code == 400, r.text
    assert message in r.text


@pytest.mark.engine
def test_server_keeps_serving_after_bad_tables(radix_server):
    _generate(radix_server.base_url, BAD_TABLES[0][0])
    ok = _generate(radix_server.base_url, {"td_round": 0, "td_agent": 1, "td_seg_ids": ["r0/a0"], "td_seg_starts": [10], "td_seg_ends": [20]})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["output_ids"]) == 2
