"""Canonical base planning (pure): one canonical base per round from the agents present; an agent whose private part
is longer than the base gets a base of its own. And the selection step when the pool has no room for its probe."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tokendance_sgl  # noqa: F401
from tokendance_sgl.bases import CanonicalBases, align_up


def _collector(align=16, gap=64):
    return CanonicalBases(SimpleNamespace(base_align=align, max_gap=gap))


def test_one_base_covers_the_agents_present():
    c = _collector()
    starts = [130, 141, 152, 160]
    assert c.plan("r1", starts) == [160]
    assert all(c.base_for("r1", s) == 160 for s in starts)


def test_an_agent_with_a_longer_private_part_gets_its_own_base():
    c = _collector()
    c.plan("r1", [130, 141, 152])
    assert c.base_for("r1", 300) == 304  # region starts after the base: its own base
    assert c.bases["r1"] == [160, 304]
    # a late arrival whose start is far below every base (gap > 64) opens one too
    assert c.base_for("r1", 40) == 48
    # rounds do not share bases
    assert c.base_for("r2", 141) == 144


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2000), min_size=1, max_size=16), st.sampled_from([1, 8, 16]), st.integers(0, 128))
def test_bases_cover_every_start_within_the_gap(starts, align, gap):
    c = _collector(align, gap)
    bases = c.plan("r", starts)
    for s in starts:
        b = c.base_for("r", s)
        assert s <= b <= s + gap
        assert b % align == 0 or align_up(s, align) - s > gap  # aligned whenever an aligned base fits
    assert c.bases["r"] == bases
    assert len(bases) <= len(set(starts))


def test_a_probe_without_room_is_counted_and_leaves_the_static_positions(monkeypatch):
    """No KV room for a selection probe: nothing is measured, the segment keeps its static (sink) positions, and
    ``probe_no_room`` says so (a benchmark can tell a smaller recompute budget from a choice)."""
    from tokendance_sgl import collector as col
    from tokendance_sgl.accounting import TreeStats
    from tokendance_sgl.request_state import RowPlan, SelectItem, state_of
    from tokendance_sgl.selection import parse_policy

    monkeypatch.setattr(col, "run_probe", lambda *a, **k: None)
    host = SimpleNamespace(stats=TreeStats(), page_size=1, config=SimpleNamespace(page_select=False),
                           alloc_slots=None, token_to_kv_pool_allocator=None)
    policy = parse_policy("sink:2+deviation:0.5")
    req = SimpleNamespace(origin_input_ids=[1, 2, 3])
    items = [SelectItem(10, 8, policy, None, np.array([0, 1])), SelectItem(30, 8, policy, None, np.array([0, 1]))]
    state_of(req).row_plan = RowPlan(compute_spans=[(10, 12), (30, 32)], select=items, probe_start=5,
                                     private_copies=True)
    collector = col.KVCollector(host)
    assert collector.select(worker=None, batch=SimpleNamespace(reqs=[req])) == {}
    counters = host.stats.counters
    assert counters["probe_no_room"] == 2 and counters["selections"] == 0 and counters["probe_tokens"] == 0
    plan = state_of(req).row_plan
    assert plan.compute_spans == [(10, 12), (30, 32)] and plan.select == []  # the sink positions alone
