"""When a request's lead (its own text before the first reused segment) is left to SGLang's chunked prefill
(:func:`tokendance_sgl.lead_chunk.lead_cut`); the path through the engine is tested in ``test_segment_reuse.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import tokendance_sgl  # noqa: F401
from tokendance_sgl.lead_chunk import lead_cut
from tokendance_sgl.position_map import MasterRuns
from tokendance_sgl.request_state import PlannedSegment, RequestState, RowLayout
from tokendance_sgl.reuse import prepass_tokens
from tokendance_sgl.selection import parse_policy


def _req(start, seg_start, seg_len=40, policy="sink:2", end=None):
    seg = PlannedSegment(seg_start, seg_start + seg_len, "r0/a0", "k", "table", "resident", seg_len)
    layout = RowLayout(start, end or seg_start + seg_len, parse_policy(policy),
                       MasterRuns.of([(seg_start, seg_start + seg_len, seg)]), (0, "ns"))
    return SimpleNamespace(td=RequestState(layout=layout))


def _adder(room, new_chunked=None):
    return SimpleNamespace(rem_chunk_tokens=room, new_chunked_req=new_chunked)


@pytest.mark.parametrize("page", [1, 4])
def test_a_region_that_does_not_fit_the_chunk_is_cut_at_its_first_page(page):
    req = _req(8, 103)
    tree = SimpleNamespace(page_size=page)
    need = prepass_tokens(req.td.layout)  # the lead (95 tokens) and the segment's pre-pass
    assert need > 95
    assert lead_cut(tree, _adder(need), req, False) == 103 // page * page  # does not fit: cut
    assert lead_cut(tree, _adder(need + 1), req, False) == 0  # fits what is left of the chunk: the pre-pass
    assert lead_cut(tree, _adder(None), req, False) == 0  # chunked prefill off


def test_no_cut_without_a_whole_page_of_lead_or_while_sglang_chunks_another_request():
    tree = SimpleNamespace(page_size=16)
    assert lead_cut(tree, _adder(8), _req(32, 40), False) == 0  # the lead is less than a page
    assert lead_cut(tree, _adder(8), _req(32, 32), False) == 0  # no lead
    assert lead_cut(tree, _adder(8), _req(0, 100), True) == 0  # SGLang tracks one chunked request at a time
    assert lead_cut(tree, _adder(8, new_chunked=object()), _req(0, 100), False) == 0
    assert lead_cut(tree, _adder(8), _req(0, 100, policy="full"), False) == 0  # `full` keeps its pre-pass
    assert lead_cut(tree, _adder(8), SimpleNamespace(td=RequestState()), False) == 0  # nothing to compose
    assert lead_cut(tree, _adder(8), _req(0, 100), False) == 96
