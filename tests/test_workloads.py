"""Workload generator: determinism per seed, exact segment spans, orders, styles, lengths, output cleaning.

Fast, no server: outputs are simulated with ``Workload.fake_outputs``.  Uses the prepared model's tokenizer (the
``model_path`` fixture of tests/conftest.py when it exists, else ``tokendance_sgl.model.prepare_model()``).
"""

from __future__ import annotations

import random

import pytest

import tokendance_sgl  # noqa: F401  (prepares the CPU environment before anything imports sglang)
from tokendance_sgl.chat_ids import EMPTY_OUTPUT_FILLER, clean_output
from tokendance_sgl.workloads import Workload, simulate

STYLES = ["generative_agents", "agent_society"]


@pytest.fixture(scope="module")
def tokenizer(request):
    try:
        path = request.getfixturevalue("model_path")
    except pytest.FixtureLookupError:
        from tokendance_sgl.model import prepare_model

        path = prepare_model()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _flatten(rounds):
    """A comparable view of a simulated run: ids, tables and outputs of every request."""
    out = []
    for reqs, outs in rounds:
        for q in reqs:
            out.append((q.round, q.agent, tuple(q.input_ids), tuple(sorted(q.custom_params.items(), key=str)),
                        tuple(q.segments), q.task_kind))
        out.append(tuple(sorted((k, tuple(v)) for k, v in outs.items())))
    return out


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("order", ["same", "permuted"])
def test_deterministic_per_seed(tokenizer, style, order):
    a = simulate(Workload(style, 5, 3, seed=7, tokenizer=tokenizer, order=order))
    b = simulate(Workload(style, 5, 3, seed=7, tokenizer=tokenizer, order=order))
    c = simulate(Workload(style, 5, 3, seed=8, tokenizer=tokenizer, order=order))
    assert _flatten(a) == _flatten(b)
    assert _flatten(a) != _flatten(c)
    # The prompts themselves differ with the seed (not only the simulated outputs).
    assert [q.input_ids for q in a[0][0]] != [q.input_ids for q in c[0][0]]


def test_build_round_independent_of_global_random(tokenizer):
    random.seed(1)
    a = _flatten(simulate(Workload("ga", 4, 2, seed=3, tokenizer=tokenizer)))
    random.seed(999)
    for _ in range(17):
        random.random()
    b = _flatten(simulate(Workload("ga", 4, 2, seed=3, tokenizer=tokenizer)))
    assert a == b


def _check_table(q, n_tokens):
    cp = q.custom_params
    assert cp["td_round"] == q.round and cp["td_agent"] == q.agent
    assert cp["td_out_seg"] == f"r{q.round}/a{q.agent}"
    ids, starts, ends = cp["td_seg_ids"], cp["td_seg_starts"], cp["td_seg_ends"]
    assert len(ids) == len(starts) == len(ends)
    assert [(i, s, e) for i, s, e in zip(ids, starts, ends)] == list(q.segments)
    prev_end = 0
    for s, e in zip(starts, ends):
        assert 0 <= prev_end <= s < e <= n_tokens
        prev_end = e
    # custom_params holds only scalars or flat lists of scalars (SGLang's rule)
    for v in cp.values():
        if isinstance(v, list):
            assert all(isinstance(x, (int, str, float, bool)) for x in v)
        else:
            assert isinstance(v, (int, str, float, bool))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("order", ["same", "permuted"])
def test_spans_hold_exact_output_ids(tokenizer, style, order):
    n, rounds = 6, 4
    w = Workload(style, n, rounds, seed=11, tokenizer=tokenizer, order=order)
    sim = simulate(w)
    for r, (reqs, _outs) in enumerate(sim):
        assert [q.agent for q in reqs] == list(range(n))
        for q in reqs:
            _check_table(q, len(q.input_ids))
            if r == 0:
                assert q.segments == []
                continue
            prev_outs = sim[r - 1][1]
            assert sorted(q.custom_params["td_seg_ids"]) == sorted(f"r{r - 1}/a{j}" for j in range(n))
            for sid, s, e in q.segments:
                j = int(sid.split("/a")[1])
                expected = clean_output(prev_outs[j], w.stop_ids, w.filler_ids)
                assert q.input_ids[s:e] == expected, (sid, q.agent)
                assert expected and expected[-1] not in w.stop_ids
            assert q.shared_tokens == sum(e - s for _, s, e in q.segments)


@pytest.mark.parametrize("style", STYLES)
def test_same_order_is_agent_order_and_blocks_identical(tokenizer, style):
    w = Workload(style, 5, 2, seed=2, tokenizer=tokenizer, order="same")
    reqs = simulate(w)[1][0]
    blocks = []
    for q in reqs:
        assert q.custom_params["td_seg_ids"] == [f"r0/a{j}" for j in range(5)]
        s0, e1 = q.segments[0][1], q.segments[-1][2]
        blocks.append(q.input_ids[s0:e1])
    # With the same order the whole shared block (labels included) is the same id sequence for every agent.
    assert all(b == blocks[0] for b in blocks)


def test_permuted_order_really_permutes(tokenizer):
    n = 8
    w = Workload("ga", n, 3, seed=5, tokenizer=tokenizer, order="permuted")
    sim = simulate(w)
    orders = set()
    for r in (1, 2):
        for q in sim[r][0]:
            seg_order = [int(s.split("/a")[1]) for s in q.custom_params["td_seg_ids"]]
            assert sorted(seg_order) == list(range(n))
            assert seg_order == w.shared_order(r, q.agent)
            orders.add(tuple(seg_order))
    assert len(orders) > 1
    assert tuple(range(n)) not in orders or len(orders) > 2


@pytest.mark.parametrize("style", STYLES)
def test_lengths_within_configured_ranges(tokenizer, style):
    priv, task = (120, 200), (30, 70)
    w = Workload(style, 10, 4, seed=4, tokenizer=tokenizer, private_tokens=priv, task_tokens=task,
                 max_new_tokens=20, memory_cap=40)
    sim = simulate(w)
    seen_private, seen_task = set(), set()
    for reqs, outs in sim:
        for q in reqs:
            assert priv[0] <= q.base_private_tokens <= priv[1]
            assert q.base_private_tokens <= q.private_tokens
            # memory adds at most the cap plus its short framing
            assert q.private_tokens - q.base_private_tokens <= 40 + 16 * w.n_rounds
            assert task[0] <= q.task_tokens <= task[1]
            assert q.sampling_params["max_new_tokens"] == 20
            seen_private.add(q.base_private_tokens)
            seen_task.add(q.task_tokens)
        for ids in outs.values():
            assert 1 <= len(ids) <= 20 + 1
    assert len(seen_private) > 1 and len(seen_task) > 1  # drawn from the range, not constant


def test_generative_agents_defaults(tokenizer):
    w = Workload("ga", 4, 3, seed=0, tokenizer=tokenizer)
    assert w.private_tokens == (300, 600) and w.task_tokens == (50, 150)
    reqs = w.build_round(0)
    text = reqs[0].decode(tokenizer)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Elmbrook" in text
    for q in reqs:
        assert 300 <= q.base_private_tokens <= 600 and 50 <= q.task_tokens <= 150
    assert {q.task_kind for q in reqs} <= {"plan", "converse", "react"}
    # names are distinct
    assert len({a.name for a in w.agents}) == 4


def test_agent_society_many_agents(tokenizer):
    w = Workload("as", 60, 2, seed=0, tokenizer=tokenizer)
    assert len({a.name for a in w.agents}) == 60
    sim = simulate(w)
    q = sim[1][0][17]
    text = q.decode(tokenizer, mark_segments=True)
    assert "Latest posts on the feed:" in text and "[[r0/a" in text
    assert len(q.segments) == 60
    assert {x.task_kind for x in sim[0][0]} <= {"post", "reply", "react"}


def test_many_generative_agents_get_unique_names(tokenizer):
    w = Workload("ga", 30, 1, seed=1, tokenizer=tokenizer)
    assert len({a.name for a in w.agents}) == 30


def test_clean_output_strips_trailing_stop_ids(tokenizer):
    w = Workload("ga", 2, 2, seed=0, tokenizer=tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in w.stop_ids and tokenizer.eos_token_id in w.stop_ids
    body = tokenizer.encode("Hello there.", add_special_tokens=False)
    assert w.clean(body + [im_end]) == body
    assert w.clean(body + [im_end, im_end]) == body
    assert w.clean(body) == body
    # a stop id in the middle is kept (only trailing ones go)
    assert w.clean(body[:1] + [im_end] + body[1:]) == body[:1] + [im_end] + body[1:]
    # empty output -> the documented filler
    filler = tokenizer.encode(EMPTY_OUTPUT_FILLER, add_special_tokens=False)
    assert w.clean([im_end]) == filler and w.clean([]) == filler
    assert clean_output([im_end], [im_end]) == []


def test_empty_outputs_use_filler_and_spans_stay_exact(tokenizer):
    w = Workload("ga", 3, 2, seed=0, tokenizer=tokenizer)
    w.build_round(0)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = tokenizer.encode("I will go to the market.", add_special_tokens=False)
    reqs = w.build_round(1, {0: [im_end], 1: body + [im_end], 2: body})
    for q in reqs:
        spans = {sid: q.input_ids[s:e] for sid, s, e in q.segments}
        assert spans["r0/a0"] == w.filler_ids
        assert spans["r0/a1"] == body and spans["r0/a2"] == body


def test_memory_of_own_outputs_grows_and_is_capped(tokenizer):
    w = Workload("ga", 3, 5, seed=0, tokenizer=tokenizer, memory_cap=30, max_new_tokens=12)
    sim = simulate(w)
    priv = [[q.private_tokens - q.base_private_tokens for q in reqs] for reqs, _ in sim]
    assert priv[0] == [0, 0, 0]
    assert all(p > 0 for p in priv[1])
    assert all(p <= 30 + 16 for row in priv for p in row)
    # own previous output appears in the private part (before the user turn)
    q = sim[1][0][2]
    own = w.clean(sim[0][1][2])
    user_start = q.segments[0][1]
    head = q.input_ids[:user_start]
    assert any(head[k:k + len(own)] == own for k in range(len(head) - len(own) + 1))


def test_round_requires_all_previous_outputs(tokenizer):
    w = Workload("ga", 3, 2, seed=0, tokenizer=tokenizer)
    w.build_round(0)
    with pytest.raises(ValueError):
        w.build_round(1, {0: [5], 1: [6]})
    with pytest.raises(ValueError):
        w.build_round(2, {0: [5], 1: [6], 2: [7]})
    with pytest.raises(ValueError):
        Workload("nope", tokenizer=tokenizer)


def test_payload_shape(tokenizer):
    w = Workload("as", 3, 2, seed=0, tokenizer=tokenizer, namespace="exp1")
    q = simulate(w)[1][0][0]
    p = q.payload(max_new_tokens=7, ignore_eos=True)
    assert p["input_ids"] == q.input_ids
    sp = p["sampling_params"]
    assert sp["max_new_tokens"] == 7 and sp["ignore_eos"] is True and sp["temperature"] == 0.0
    assert sp["custom_params"]["td_ns"] == "exp1"
    assert sp["custom_params"]["td_seg_ids"] == q.custom_params["td_seg_ids"]
