"""Segment reuse at ``--page-size`` 16 through the real engine, on the history workload (one turn per round). (Page
size 4 runs through the engine in ``test_segment_reuse.py``, with a lead prefilled by SGLang's chunks.)

* ``full`` equals radix (page size 1, exact) token for token;
* ``sink:4`` and ``deviation:0.15`` stay within a margin of their page-size-1 fidelity (teacher-forced against exact
  prefill of the same prompts, rounds >= 1), measured in the same run on the shared page-size-1 server;
* whole master pages are shared, the pages rows mix are copied on write (counted), nothing leaks.
"""

from __future__ import annotations

import pytest

from test_history import _requests, _run, _score_exact, _stats

pytestmark = pytest.mark.engine

KW = {"n": 3, "turns": 1, "max_new": 24}
POLICIES = ("sink:4", "deviation:0.15")
TOP1_MARGIN, KL_MARGIN = 0.1, 0.1  # below page size 1's top-1 / above its KL (means over rounds >= 1)


def _fidelity(exact_url, res) -> tuple[float, float]:
    """Mean top-1 agreement and KL over the rounds >= 1 (each round weighted by its scored positions)."""
    per_round = {r: v for r, v in _score_exact(exact_url, res).items() if r >= 1}
    n = sum(k for k, _, _ in per_round.values())
    return sum(k * t for k, t, _ in per_round.values()) / n, sum(k * d for k, _, d in per_round.values()) / n


@pytest.fixture(scope="module")
def exact_url(server_factory):
    return server_factory("radix", "--disable-radix-cache").base_url


@pytest.fixture(scope="module")
def reference(server_factory, radix_server, exact_url, model_path):
    """Radix's outputs and the page-size-1 fidelity of each policy, on this workload."""
    td = server_factory("tokendance").base_url
    fid = {p: _fidelity(exact_url, _run(td, model_path, policy=p, logprobs=True, **KW)) for p in POLICIES}
    print(f"page size 1 fidelity (top-1, KL): {fid}")
    return _run(radix_server.base_url, model_path, **KW), fid


@pytest.mark.parametrize("ps", [16])
def test_pages_full_is_exact_and_policies_keep_their_fidelity(ps, own_server, reference, exact_url, model_path,
                                                              record_property):
    radix, ref = reference
    url = own_server("tokendance", "--page-size", str(ps)).base_url
    full = _run(url, model_path, policy="full", **KW)
    for key, a in _requests(full).items():
        assert a.output_ids == _requests(radix)[key].output_ids, key
    got = {}
    for policy in POLICIES:
        before = _stats(url)
        got[policy] = top1, kl = _fidelity(exact_url, _run(url, model_path, policy=policy, logprobs=True, **KW))
        s = _stats(url)
        assert s["reused_tokens"] > before["reused_tokens"], (policy, s)  # masters were read, not recomputed
        assert s["prepass_fallbacks"] == before["prepass_fallbacks"], (policy, s)  # no pre-pass failed
        assert top1 >= ref[policy][0] - TOP1_MARGIN and kl <= ref[policy][1] + KL_MARGIN, (policy, got, ref)
    record_property("fidelity", {"page_size": ps, "paged": got, "page_size_1": ref})
    print(f"page size {ps} fidelity (top-1, KL): {got}; page size 1: {ref}")
    s = _stats(url)
    assert s["cow_pages"] > 0 and s["cow_tokens"] > 0, s  # a segment's first and last pages mix with the text
    assert s["rows"] == 0 and s["available_size"] + s["evictable_size"] + s["protected_size"] == \
        s["max_total_num_tokens"], s
