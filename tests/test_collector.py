"""Canonical base planning (pure): one canonical base per round from the agents present; an agent whose private part
is longer than the base gets a base of its own."""

from __future__ import annotations

from types import SimpleNamespace

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
