"""Segment reuse through the real engine: exactness of `full`, fidelity of the approximate policies, reporting.

Reference: exact prefill (``--kv-backend radix --disable-radix-cache``: no prefix cache, true positions). The same
4-agent x 3-round GenerativeAgents-like workload runs there first; its prompts are then replayed on the tokendance
server, so both servers see identical prompts in every round.

The module ends on one paged server (``--page-size 16 --chunked-prefill-size 256``): the history workload (one turn
per round), where ``full`` equals radix token for token and ``sink:4`` / ``deviation:0.15`` stay within bounds set
from their page-size-1 fidelity (whole master pages shared, the pages a row mixes copied on write); and round 1's
prompts behind a 300-token lead that SGLang's chunks prefill before the region is composed.
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from test_history import _requests, _score_exact, _stats
from test_history import _run as _run_history

from tokendance_sgl.fidelity import compare_responses
from tokendance_sgl.runner import _post_generate, flush_cache, run_workload
from tokendance_sgl.workloads import Workload

pytestmark = pytest.mark.engine

N_AGENTS, N_ROUNDS, MAX_NEW = 4, 3, 32
TOP_K = 20
FIDELITY_POLICIES = ("none", "sink:2", "sink:8")
# (min teacher-forced top-1 agreement, max mean top-20 KL). Measured on CPU with SmolLM2-135M (round 1, 160 task
# positions): none 0.850 / 0.108, sink:2 0.869 / 0.108, sink:8 0.881 / 0.059 (greedy agreement of the first 32
# tokens 0.27 / 0.33 / 0.37). Wrong rotations or stale masters fall far below these.
THRESHOLDS = {"none": (0.75, 0.2), "sink:2": (0.75, 0.2), "sink:8": (0.78, 0.12)}
# Same recompute budget on tokendance (collective choice, aligned positions) and pic (per-request choice, true
# positions).
BUDGET_POLICIES = ("sink:4", "deviation:0.15", "sink:2+deviation:0.1")
# Measured (CPU, SmolLM2-135M, round 1, 160 task positions), tokendance vs pic: sink:4 top-1 0.869 / 0.869, KL 0.079 /
# 0.075; deviation:0.15 0.869 / 0.863, KL 0.064 / 0.058; sink:2+deviation:0.1 0.888 / 0.875, KL 0.063 / 0.046 (0.052
# when another agent was the pilot, before the pilot stopped depending on arrival order). Top-1 (the primary metric)
# is at least pic's; KL is 5-36 % higher (one shared choice per segment, and the position gap of the aligned layout).
# Between runs one of the 160 positions can flip (deviation:0.15 0.856 vs 0.863, sink:2+deviation:0.1 0.869 vs
# 0.875 seen): the four requests of a round do not always reach the scheduler in one batch, and the batched CPU
# forward is not bit-identical across batch shapes. So top-1 may trail pic's by one position.
# tokendance reuses one pilot's deviation choice for every agent, pic chooses per agent: measured runs differ by 0 to
# 3 of the 160 scored positions either way (CI, 2026-12-01: sink:4 0.8625 vs 0.8688, deviation:0.15 0.8562 vs
# 0.8625, sink:2+deviation:0.1 0.8562 vs 0.875; earlier runs had tokendance ahead by up to 2). The margin is 5
# positions (3 %); a wrong rotation or a stale master costs 10-20 points (THRESHOLDS above).
TOP1_MARGIN, KL_RATIO = 5.01 / 160, 1.5
_COUNTER_KEYS = ("rows_composed", "reused_tokens", "recomputed_tokens", "master_copies", "probe_tokens")
_WORK_KEYS = ("rotated_tokens", "prepass_text_tokens")


def _task_start(q) -> int:
    return len(q.input_ids) - q.task_tokens


def _logprob_hook(q, payload):
    payload.update(return_logprob=True, logprob_start_len=_task_start(q), top_logprobs_num=TOP_K)


def _payload(rec, *, policy=None, keep_out_seg=True):
    cp = dict(rec.custom_params)
    if not keep_out_seg:
        cp.pop("td_out_seg", None)
    if policy is not None:
        cp["td_recompute"] = policy
    task_start = len(rec.input_ids) - rec.meta_info["_task_tokens"]
    return {
        "input_ids": list(rec.input_ids),
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0.0, "custom_params": cp},
        "return_logprob": True, "logprob_start_len": task_start, "top_logprobs_num": TOP_K,
    }


def _post_round(url, payloads):
    """The round's requests, released to the scheduler together: generation is paused while they are sent (they wait
    in the tokenizer manager), so which agents share a batch -- and so the round's pilots -- does not depend on
    arrival timing."""
    requests.post(url + "/pause_generation", json={"mode": "in_place"}, timeout=120).raise_for_status()
    try:
        with ThreadPoolExecutor(len(payloads)) as pool:
            futures = [pool.submit(_post_generate, url, p, 1800.0) for p in payloads]
            time.sleep(1.0)  # every request is waiting behind the pause
            requests.post(url + "/continue_generation", json={}, timeout=120).raise_for_status()
            return [f.result()[0] for f in futures]
    finally:
        requests.post(url + "/continue_generation", json={}, timeout=120)


@pytest.fixture(scope="module")
def exact_run(server_factory, model_path):
    server = server_factory("radix", "--disable-radix-cache")
    w = Workload("ga", N_AGENTS, N_ROUNDS, seed=0, tokenizer=model_path, private_tokens=(120, 160),
                 task_tokens=(30, 50))
    tasks = {}

    def hook(q, p):
        _logprob_hook(q, p)
        tasks[(q.round, q.agent)] = q.task_tokens

    res = run_workload(server.base_url, w, max_new_tokens=MAX_NEW, payload_hook=hook, progress=False)
    for rec in res.rounds:
        for a in rec.agents:
            a.meta_info["_task_tokens"] = tasks[(rec.round, a.agent)]
    return res


@pytest.fixture(scope="module")
def td_replay(server_factory, exact_run):
    """Round 0 on tokendance (registers the outputs), the fidelity probes of round 1 per policy, then rounds 1 and
    2 with ``full``. Returns {label: [bodies per round]}."""
    server = server_factory("tokendance")
    url = server.base_url
    flush_cache(url)
    out: dict = {"stats0": _stats(url)}
    rounds = exact_run.rounds
    out["r0"] = _post_round(url, [_payload(a) for a in rounds[0].agents])
    for pol in FIDELITY_POLICIES + BUDGET_POLICIES:
        before = _stats(url)
        out[pol] = _post_round(url, [_payload(a, policy=pol, keep_out_seg=False) for a in rounds[1].agents])
        out["stats", pol] = _delta(before, _stats(url))
    out["stats_probe"] = _stats(url)
    out["full"] = [out["r0"]] + [
        _post_round(url, [_payload(a, policy="full") for a in rounds[r].agents]) for r in range(1, N_ROUNDS)
    ]
    out["stats_end"] = _stats(url)
    return out


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k, v in after.items() if isinstance(v, int) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def pic_replay(server_factory, exact_run):
    """The same round-1 probes on ``--kv-backend pic`` (per-request private copies at true positions)."""
    url = server_factory("pic").base_url
    flush_cache(url)
    rounds = exact_run.rounds
    out: dict = {"r0": _post_round(url, [_payload(a) for a in rounds[0].agents])}
    for pol in BUDGET_POLICIES:
        before = _stats(url)
        out[pol] = _post_round(url, [_payload(a, policy=pol, keep_out_seg=False) for a in rounds[1].agents])
        out["stats", pol] = _delta(before, _stats(url))
    out["stats_end"] = _stats(url)
    return out


def _assert_same_logprobs(ref_meta, meta, tol=2e-3):
    a = [x[0] for x in ref_meta["input_token_logprobs"] if x[0] is not None]
    b = [x[0] for x in meta["input_token_logprobs"] if x[0] is not None]
    assert len(a) == len(b) > 0
    assert max(abs(x - y) for x, y in zip(a, b)) < tol


def test_full_recompute_equals_exact_prefill(exact_run, td_replay):
    for r, rec in enumerate(exact_run.rounds):
        for a, body in zip(rec.agents, td_replay["full"][r]):
            assert body["output_ids"] == a.output_ids, f"round {r} agent {a.agent} diverged from exact prefill"
            _assert_same_logprobs(a.meta_info, body["meta_info"])
            if r > 0:  # `full` reuses no master: only the radix prefix counts as cached
                assert body["meta_info"]["cached_tokens"] <= a.segments[0][1]
    s0, s1 = td_replay["stats_probe"], td_replay["stats_end"]
    assert s1["rows_composed"] - s0["rows_composed"] == N_AGENTS * (N_ROUNDS - 1)
    assert s1["reused_tokens"] == s0["reused_tokens"]  # nothing reused under `full`
    assert s1["recomputed_tokens"] - s0["recomputed_tokens"] >= sum(
        e - s for rec in exact_run.rounds[1:] for a in rec.agents for _, s, e in a.segments
    ) * 0.9


def test_reuse_counts_cached_tokens_and_reports_stats(exact_run, td_replay):
    shared = sum(e - s for a in exact_run.rounds[1].agents for _, s, e in a.segments)
    # counters since the flush of this module (the shared server served other modules before)
    s = dict(td_replay["stats_probe"])
    s.update({k: v for k, v in _delta(td_replay["stats0"], s).items() if k in _COUNTER_KEYS + _WORK_KEYS})
    assert s["rows_composed"] == N_AGENTS * len(FIDELITY_POLICIES + BUDGET_POLICIES)
    none_reused = 0
    for a, body in zip(exact_run.rounds[1].agents, td_replay["none"]):
        seg_tokens = sum(e - s_ for _, s_, e in a.segments)
        # with `none` every segment token that has master KV is taken from it (and counted as cached)
        assert body["meta_info"]["cached_tokens"] >= seg_tokens - len(a.segments)
        none_reused += seg_tokens
    assert s["reused_tokens"] >= none_reused - 4 * N_AGENTS
    assert s["master_copies"] >= 1 and s["rotated_tokens"] > 0
    assert s["recomputed_tokens"] > 0 and s["prepass_text_tokens"] > 0
    assert s["master_slots"] > 0 and s["rounds_seen"] >= 2
    assert shared > 0
    # idle: no row alive, SGLang's pool identity holds
    end = td_replay["stats_end"]
    assert end["rows"] == 0 and end["diff_slots"] == 0
    assert end["available_size"] + end["evictable_size"] + end["protected_size"] == end["max_total_num_tokens"]
    assert end["kv_bytes_by_agent_cumulative"] and all(v > 0 for v in end["kv_bytes_by_agent_cumulative"].values())


def test_fidelity_of_approximate_policies(exact_run, td_replay, record_property):
    refs = [a for a in exact_run.rounds[1].agents]
    ref_bodies = [{"output_ids": a.output_ids, "meta_info": a.meta_info} for a in refs]
    report = {}
    for pol in FIDELITY_POLICIES:
        f = compare_responses(ref_bodies, td_replay[pol], n=MAX_NEW)
        report[pol] = f.as_dict()
    print("\nfidelity vs exact prefill (round 1, 4 agents):", json.dumps(report, indent=1))
    record_property("fidelity", json.dumps(report))
    for pol, (min_top1, max_kl) in THRESHOLDS.items():
        assert report[pol]["top1"] >= min_top1, (pol, report[pol])
        assert report[pol]["kl"] <= max_kl, (pol, report[pol])


def test_bad_recompute_policy_is_refused_with_400(server_factory, exact_run):
    url = server_factory("tokendance").base_url
    a = exact_run.rounds[1].agents[0]
    body = _payload(a, policy="sideways", keep_out_seg=False)
    r = requests.post(url + "/generate", json=body, timeout=600)
    assert r.status_code == 400 and "recompute policy" in r.text
    ok = requests.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}, timeout=600)
    assert ok.status_code == 200


def _memory_run(url, model_path, n):
    """(used slots at idle, stats with the counters of this run only, result)."""
    flush_cache(url)
    before = _stats(url)
    w = Workload("ga", n, 2, seed=1, tokenizer=model_path, private_tokens=(60, 90), task_tokens=(20, 30))
    res = run_workload(url, w, max_new_tokens=16, progress=False)
    s = _stats(url)
    assert s["available_size"] + s["evictable_size"] + s["protected_size"] == s["max_total_num_tokens"]
    if "rows_composed" in s:
        s.update({k: v for k, v in _delta(before, s).items() if k in before and k in _COUNTER_KEYS})
    return s["max_total_num_tokens"] - s["available_size"], s, res


def test_shared_region_is_held_once_per_base_not_once_per_agent(server_factory, radix_server, model_path):
    """8 agents, 2 rounds, same workload on radix and tokendance, measured at idle after the round: radix keeps
    every agent's copy of the shared block (8 x S slots in its tree); tokendance keeps the masters (one re-rotated
    copy per segment and base) and, in every agent's cached path, only that agent's diffs (its recomputed
    positions)."""
    n = 8
    used = {backend: _memory_run(url, model_path, n)
            for backend, url in (("radix", radix_server.base_url), ("tokendance", server_factory("tokendance").base_url))}
    r_used, _, r_res = used["radix"]
    used["pic"] = _memory_run(server_factory("pic").base_url, model_path, n)
    t_used, ts, t_res = used["tokendance"]
    # Every agent of a round sees the same block (order "same"); round-0 outputs normally agree across the two
    # servers, and any difference in length is allowed for below.
    S_r, S_t = (res.rounds[1].agents[0].shared_tokens for res in (r_res, t_res))
    assert S_r > 0 and all(a.shared_tokens == S_t for a in t_res.rounds[1].agents)
    S = min(S_r, S_t)
    copies = ts["master_copy_slots"]
    assert copies <= 3 * S_t, ts  # at most a few canonical bases per round
    assert ts["diff_slots"] == 0 and ts["rows"] == 0
    slack = 16 * n + n * abs(S_r - S_t)
    r_td = ts["recomputed_tokens"] / n  # per agent, round 1 (round 0 reuses nothing)
    assert t_used <= r_used - n * S + copies + n * r_td + slack, (r_used, t_used, S, copies, r_td)
    assert r_used - t_used >= n * S // 2
    # While a round runs (KV per agent at release, masters divided among the rows sharing them): pic holds a dense
    # private copy of the shared block per agent (about N x S), tokendance the masters plus per-agent diffs
    # (S + N x recomputed per agent).
    _, ps, p_res = used["pic"]
    S_p = p_res.rounds[1].agents[0].shared_tokens
    pic_total = n * ps["kv_per_agent_by_round"]["1"]["tokens"]
    td_total = n * ts["kv_per_agent_by_round"]["1"]["tokens"]
    assert ps["rows_composed"] == n and ps["master_copies"] == 0, ps
    # The same recompute budget: 8 agents x 8 segments x sink:4 = 256 each. (Runs that saw 192 on pic had a pic
    # server started after test_plugin had exported TOKENDANCE_RECOMPUTE=deviation:0.15 into this process.)
    assert ps["recomputed_tokens"] == ts["recomputed_tokens"] > 0, (ps, ts)
    assert pic_total - td_total >= 0.9 * (n * S_p - S_p - n * r_td) - slack, (pic_total, td_total, S_p, r_td)
    # The shared block alone (the rows' segment spans): a pic row holds every token of it, a tokendance row its
    # recomputed positions plus its share of the masters it reads.
    p1, t1 = ps["kv_per_agent_by_round"]["1"], ts["kv_per_agent_by_round"]["1"]
    assert p1["shared_held_tokens"] == p1["shared_tokens"] and p1["shared_tokens"] >= 0.9 * S_p, p1
    assert 0.9 * S_t <= t1["shared_tokens"] <= S_t, t1
    assert r_td <= t1["shared_held_tokens"] <= r_td + (copies + S_t) / n + 1, (t1, r_td, copies)


def test_tokendance_fidelity_is_at_least_pics_at_the_same_budget(exact_run, td_replay, pic_replay, record_property):
    refs = [{"output_ids": a.output_ids, "meta_info": a.meta_info} for a in exact_run.rounds[1].agents]
    report = {}
    for pol in BUDGET_POLICIES:
        td = compare_responses(refs, td_replay[pol], n=MAX_NEW).as_dict()
        pic = compare_responses(refs, pic_replay[pol], n=MAX_NEW).as_dict()
        tds, pics = td_replay["stats", pol], pic_replay["stats", pol]
        report[pol] = {"tokendance": td, "pic": pic,
                       "recomputed": {"tokendance": tds["recomputed_tokens"], "pic": pics["recomputed_tokens"]},
                       "probe_tokens": {"tokendance": tds["probe_tokens"], "pic": pics["probe_tokens"]}}
    print("\nsame budget, tokendance vs pic (round 1, 4 agents):", json.dumps(report, indent=1))
    record_property("budget_fidelity", json.dumps(report))
    for pol, r in report.items():
        assert r["recomputed"]["tokendance"] == r["recomputed"]["pic"], (pol, r)  # the same budget
        assert r["tokendance"]["top1"] >= r["pic"]["top1"] - TOP1_MARGIN, (pol, r)
        assert r["tokendance"]["kl"] <= r["pic"]["kl"] * KL_RATIO + 1e-3, (pol, r)


def test_the_collective_step_pays_selection_once_per_segment(exact_run, td_replay, pic_replay):
    """deviation: tokendance probes one pilot per round (one choice per segment, shared by the other agents); pic
    probes every agent. Both recompute the same number of tokens."""
    n_seg = len(exact_run.rounds[1].agents[0].segments)
    td, pic = td_replay["stats", "deviation:0.15"], pic_replay["stats", "deviation:0.15"]
    assert td["selections"] == n_seg and td["selections_shared"] == (N_AGENTS - 1) * n_seg, td
    assert pic["selections"] == N_AGENTS * n_seg and pic["selections_shared"] == 0, pic
    assert pic["probe_tokens"] >= (N_AGENTS - 1) * td["probe_tokens"] > 0
    assert td["collect_copy_calls"] <= 1 and pic["master_copies"] == 0
    end = pic_replay["stats_end"]
    assert end["rows"] == 0 and end["available_size"] + end["evictable_size"] + end["protected_size"] == end[
        "max_total_num_tokens"]


# the paged server of the last two tests: SGLang prefills a 300-token lead in chunks of 256, ending at a page
PAGE, PAGED_CHUNK, LEAD = 16, 256, 300
HISTORY_KW = {"n": 3, "turns": 1, "max_new": 24}
# (min top-1, max KL), teacher-forced over rounds >= 1 against exact prefill. Measured on CPU with SmolLM2-135M
# (2026-12-07): page size 16 sink:4 0.974 / 0.018, deviation:0.15 0.947 / 0.032; page size 1 on the
# shared server 0.965 / 0.020 and 0.956 / 0.036. The bounds sit 0.1 below / above page size 1's: a wrong rotation,
# a stale master or a page copied from the wrong place costs 10-20 points (THRESHOLDS above).
PAGED_THRESHOLDS = {"sink:4": (0.86, 0.12), "deviation:0.15": (0.85, 0.14)}


@pytest.fixture(scope="module")
def paged_url(server_factory):
    return server_factory("tokendance", "--page-size", str(PAGE), "--chunked-prefill-size", str(PAGED_CHUNK)).base_url


def _history_fidelity(exact_url, res) -> tuple[float, float]:
    """Mean top-1 agreement and KL over the rounds >= 1 (each round weighted by its scored positions)."""
    per_round = {r: v for r, v in _score_exact(exact_url, res).items() if r >= 1}
    n = sum(k for k, _, _ in per_round.values())
    return sum(k * t for k, t, _ in per_round.values()) / n, sum(k * d for k, _, d in per_round.values()) / n


def test_pages_full_is_exact_and_policies_keep_their_fidelity(paged_url, server_factory, radix_server, model_path,
                                                              record_property):
    exact_url = server_factory("radix", "--disable-radix-cache").base_url
    radix = _requests(_run_history(radix_server.base_url, model_path, **HISTORY_KW))
    full = _run_history(paged_url, model_path, policy="full", **HISTORY_KW)
    for key, a in _requests(full).items():
        assert a.output_ids == radix[key].output_ids, key
    got = {}
    for policy, (min_top1, max_kl) in PAGED_THRESHOLDS.items():
        before = _stats(paged_url)
        got[policy] = top1, kl = _history_fidelity(
            exact_url, _run_history(paged_url, model_path, policy=policy, logprobs=True, **HISTORY_KW))
        s = _stats(paged_url)
        assert s["reused_tokens"] > before["reused_tokens"], (policy, s)  # masters were read, not recomputed
        assert s["prepass_fallbacks"] == before["prepass_fallbacks"], (policy, s)  # no pre-pass failed
        assert s["cow_pages"] > before["cow_pages"], (policy, s)  # the pages rows mix were copied on write
        assert top1 >= min_top1 and kl <= max_kl, (policy, got)
    print(f"page size {PAGE} fidelity (top-1, KL): {got}")
    record_property("fidelity", {"page_size": PAGE, "paged": got})
    s = _stats(paged_url)  # nothing leaked (as the long lead's test checks again after its own run)
    assert s["rows"] == 0 and s["available_size"] + s["evictable_size"] + s["protected_size"] == \
        s["max_total_num_tokens"], s


def _with_lead(body: dict, lead: list) -> dict:
    """``body`` with ``lead`` tokens in front of its prompt (segment spans and scored positions moved with it)."""
    out = copy.deepcopy(body)
    out["input_ids"] = list(lead) + out["input_ids"]
    cp = out["sampling_params"]["custom_params"]
    cp["td_seg_starts"] = [s + len(lead) for s in cp["td_seg_starts"]]
    cp["td_seg_ends"] = [e + len(lead) for e in cp["td_seg_ends"]]
    out["logprob_start_len"] += len(lead)
    return out


def test_a_long_lead_is_prefilled_by_sglangs_chunks_then_the_region_is_composed(paged_url, server_factory,
                                                                                 exact_run, record_property):
    """Round 1's prompts behind 300 uncached tokens of their own, on a server with ``--chunked-prefill-size 256`` and
    ``--page-size 16``: each region's pre-pass cannot fit a chunk, so SGLang's chunked prefill computes the text
    before it (the lead) up to the region's first page, and the region is composed when the chunk reaches it
    (``lead_chunks``; the pre-pass computes at most the lead's last partial page). Every pre-pass forward stays
    within the chunk, the policy keeps its fidelity against exact prefill of the same prompts, and nothing leaks."""
    url = paged_url
    flush_cache(url)  # (the history runs above left their paths)
    rounds = exact_run.rounds
    _post_round(url, [_payload(a) for a in rounds[0].agents])  # registers the round's outputs as segments
    lead = (list(rounds[0].agents[0].input_ids) + list(rounds[0].agents[1].input_ids))[::-1][:LEAD]  # no path has it
    bodies = [_with_lead(_payload(a, policy="sink:2", keep_out_seg=False), lead) for a in rounds[1].agents]
    exact_url = server_factory("radix", "--disable-radix-cache").base_url
    with ThreadPoolExecutor(len(bodies)) as pool:
        refs = list(pool.map(lambda b: _post_generate(exact_url, b, 1800.0)[0], bodies))
    before = _stats(url)
    got = _post_round(url, bodies)
    s = _stats(url)
    d = _delta(before, s)
    assert d["lead_chunks"] == N_AGENTS and d["lead_regions_lost"] == 0, d  # every region waited for its lead
    assert d["prepass_lead_tokens"] < PAGE * N_AGENTS, d  # SGLang's chunks computed the lead's whole pages
    assert d["rows_composed"] == N_AGENTS and d["reused_tokens"] > 0 and d["cow_pages"] > 0, d
    assert 0 < s["prepass_largest_forward"] <= PAGED_CHUNK, s
    assert d["slot_checks"] > 0, d  # the host's rows and free list matched the device's at every busy check
    for a, body in zip(rounds[1].agents, got):  # the reused segment tokens count as cached
        assert body["meta_info"]["cached_tokens"] >= sum(e - s_ for _, s_, e in a.segments) // 2, body["meta_info"]
    f = compare_responses(refs, got, n=MAX_NEW).as_dict()
    print(f"\nlong lead, page size {PAGE}: fidelity {f}; counters {d}")
    record_property("long_lead", json.dumps({"fidelity": f, "counters": d}))
    min_top1, max_kl = THRESHOLDS["sink:2"]
    assert f["top1"] >= min_top1 and f["kl"] <= max_kl, f
    assert s["rows"] == 0 and s["available_size"] + s["evictable_size"] + s["protected_size"] == \
        s["max_total_num_tokens"], s
