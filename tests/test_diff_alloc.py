"""DiffAllocator: rows composed of master runs and owned runs over SGLang's real CPU allocators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from tokendance_sgl.accounting import TreeStats
from tokendance_sgl.diff_alloc import DiffAllocator, MasterRun, NewRun, coalesce
from tokendance_sgl.distinct import Distinct


def make_alloc(ps: int, size: int = 64):
    if ps == 1:
        return TokenToKVPoolAllocator(size=size, dtype=torch.float32, device="cpu", kvcache=None, need_sort=False)
    return PagedTokenToKVPoolAllocator(size=size, page_size=ps, dtype=torch.float32, device="cpu", kvcache=None,
                                       need_sort=False)


def free_set(alloc) -> set[int]:
    pages = alloc.get_all_free_pages()
    return set(pages.tolist())


class KV:
    """Fake KV content: one value per slot, copied by copy_fn."""

    def __init__(self, n):
        self.v = np.full(n, -1, dtype=np.int64)
        self.calls = 0

    def copy(self, src, dst):
        self.calls += 1
        assert len(set(dst.tolist()) & set(src.tolist())) == 0
        self.v[dst.numpy()] = self.v[src.numpy()]


def test_ps1_masters_recompute_and_new():
    alloc = make_alloc(1)
    d = DiffAllocator(alloc, bytes_per_token=10.0)
    master = alloc.alloc(8)  # a segment's master slots (owned by "the tree" in this test)
    avail = alloc.available_size()
    built = d.build_row("row", 5, [MasterRun("S", master, recompute=[0, 3]), NewRun(4)], agent=7)
    slots = built.slots
    assert len(slots) == 12 and built.segs == ["S"]
    assert built.private_tokens == 2 + 4 and alloc.available_size() == avail - 6
    # positions 1,2,4..7 of the run reuse the master; 0, 3 and the new run are private
    keep = [1, 2, 4, 5, 6, 7]
    assert slots[keep].tolist() == master[keep].tolist()
    private = [0, 3, 8, 9, 10, 11]
    assert built.private_positions.tolist() == private
    assert not set(slots[private].tolist()) & set(master.tolist())
    rec = d.record("row")
    assert [(r.start, r.end) for r in rec.refs] == [(6, 8), (9, 13)]
    assert rec.master_positions().size == 6 and rec.agent == 7
    assert rec.end == 17  # the region ends after the new run
    # pop: the caller unlocks the segments the row read
    rec = d.pop_row("row")
    assert rec.segs() == ["S"] and "row" not in d


def test_ps1_no_masters_is_a_plain_alloc_and_failure_changes_nothing():
    alloc = make_alloc(1, size=8)
    d = DiffAllocator(alloc)
    b = d.build_row("r", 0, [NewRun(5)])
    assert b.private_tokens == 5 and b.segs == [] and d.record("r").refs == []
    avail = alloc.available_size()
    assert d.build_row("r2", 0, [NewRun(10)]) is None
    assert alloc.available_size() == avail and "r2" not in d


def test_ps4_page_aligned_master_pages_are_shared_and_cow_pages_copied():
    ps = 4
    alloc = make_alloc(ps)
    kv = KV(80)
    d = DiffAllocator(alloc, copy_fn=kv.copy)
    master = alloc.alloc(12)  # three whole master pages
    kv.v[master.numpy()] = np.arange(100, 112)
    # span at row position 8 (page-aligned); recompute offset 5 (second master page) -> that page is copied on write
    built = d.build_row("row", 8, [MasterRun("S", master, recompute=[5]), NewRun(3)])
    s = built.slots
    assert s[0:4].tolist() == master[0:4].tolist()
    assert s[8:12].tolist() == master[8:12].tolist()
    cow = s[4:8]
    assert not set(cow.tolist()) & set(master.tolist())
    assert (cow // ps).unique().numel() == 1 and (cow % ps).tolist() == [0, 1, 2, 3]
    # the reused tokens of the copied page carry the master's KV; the recomputed one is left for the forward
    assert kv.v[cow.numpy()].tolist() == [104, -1, 106, 107]
    assert built.copies == 3 and kv.calls == 1
    # new run gets a fresh page (3 tokens, whole page allocated)
    assert built.private_tokens == 2 * ps
    assert [(r.start, r.end) for r in d.record("row").refs] == [(8, 12), (16, 20)]
    # the row's own slots: the copied page and the new page, whole
    own = set(s[built.private_positions].tolist())
    assert {x // ps for x in own} == {int(cow[0]) // ps, int(s[12]) // ps}
    with pytest.raises(ValueError):
        d.build_row("row2", 9, [NewRun(3)])  # not page-aligned


def test_ps4_misaligned_master_run_is_copied():
    ps = 4
    alloc = make_alloc(ps)
    kv = KV(80)
    d = DiffAllocator(alloc, copy_fn=kv.copy)
    m = alloc.alloc(8)
    kv.v[m.numpy()] = np.arange(8)
    # a run of 6 master tokens starting at master offset 1: no row page matches a master page -> all copied
    built = d.build_row("r", 0, [NewRun(2), MasterRun("S", m[1:7]), NewRun(1)])
    assert d.record("r").refs == []
    assert built.segs == []
    assert kv.v[built.slots[2:8].numpy()].tolist() == [1, 2, 3, 4, 5, 6]
    # two master runs of different segments in one page: copied as well
    d2 = DiffAllocator(alloc, copy_fn=kv.copy)
    m2 = alloc.alloc(4)
    kv.v[m2.numpy()] = np.arange(50, 54)
    b = d2.build_row("r", 0, [MasterRun("S", m[0:2]), MasterRun("T", m2[2:4])])
    assert d2.record("r").refs == [] and kv.v[b.slots.numpy()].tolist() == [0, 1, 52, 53]
    # without copy_fn a copy-on-write page cannot be built: refused, nothing leaked
    d3 = DiffAllocator(alloc)
    avail = alloc.available_size()
    with pytest.raises(ValueError, match="copy_fn"):
        d3.build_row("r", 0, [MasterRun("S", m[1:5])])
    assert alloc.available_size() == avail and d3.record("r") is None
    with pytest.raises(ValueError, match="page boundary"):
        d3.build_row("r", 2, [NewRun(2)])


def test_master_refs_and_validation():
    alloc = make_alloc(1)
    d = DiffAllocator(alloc)
    m = alloc.alloc(6)
    d.build_row("r", 0, [MasterRun("S", m[:3]), NewRun(2), MasterRun("T", m[3:])])
    assert [(r.start, r.end, r.seg) for r in d.record("r").refs] == [(0, 3, "S"), (5, 8, "T")]
    assert d.record("r").refs[1].slots.tolist() == m[3:].tolist()
    d.add_master_ref("r", 10, 12, "U", torch.tensor([30, 31]))
    assert sorted(d.record("r").segs()) == ["S", "T", "U"]
    with pytest.raises(ValueError, match="overlaps"):
        d.add_master_ref("r", 11, 13, "U", torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        d.add_master_ref("r", 20, 22, "U", torch.tensor([1]))
    with pytest.raises(ValueError):
        d.build_row("x", 0, [MasterRun("S", m[:2], recompute=[2])])
    with pytest.raises(TypeError):
        d.build_row("x", 0, ["nope"])


def test_kv_bytes_by_agent_divides_master_bytes():
    alloc = make_alloc(1, size=128)
    d = DiffAllocator(alloc, bytes_per_token=2.0)
    m = alloc.alloc(10)
    # three agents share the same 10 master slots; agent 0 recomputes 2 of them; each adds 5 new tokens
    d.build_row("a0", 20, [MasterRun("S", m, recompute=[0, 1]), NewRun(5)], agent=0)
    d.build_row("a1", 20, [MasterRun("S", m), NewRun(5)], agent=1)
    d.build_row("a2", 20, [MasterRun("S", m), NewRun(5)], agent=2)
    rc = d.master_refcounts()
    assert rc[int(m[0])] == 2 and rc[int(m[5])] == 3
    toks = d.row_kv_tokens()
    # a0: 8 shared slots /3 + 7 private; a1/a2: 2 slots /2 + 8 slots /3 + 5 private
    assert toks["a0"] == pytest.approx(8 / 3 + 7)
    assert toks["a1"] == pytest.approx(2 / 2 + 8 / 3 + 5)
    by_agent = TreeStats().kv_bytes_by_agent(d)
    assert by_agent[1] == pytest.approx(2.0 * toks["a1"])
    # the master bytes are counted exactly once in total
    assert sum(by_agent.values()) == pytest.approx(2.0 * (10 + 7 + 5 + 5))
    d.record("a1").private_tokens = 0
    assert d.row_kv_tokens()["a1"] == pytest.approx(2 / 2 + 8 / 3)


def test_rows_of_one_plan_share_it_until_their_references_are_asked_for():
    """A row built from a shape keeps the shape and its start: its references, runs, segments and distinct master
    slots read the same as a row whose references were built at once; a second composition merges them."""
    alloc = make_alloc(1, size=128)
    d = DiffAllocator(alloc)
    m1, m2 = alloc.alloc(6), alloc.alloc(4)
    shape = d.plan([MasterRun("A", m1, recompute=[2]), NewRun(1), MasterRun("B", m2)])
    for key, start in (("r1", 10), ("r2", 40)):
        d.build_row(key, start, shape, agent=0)
    rec = d.record("r2")
    assert rec.segs() == ["A", "B"]
    assert rec.runs() == [(40, 42, "A"), (43, 46, "A"), (47, 51, "B")]
    assert [(r.start, r.end, r.seg) for r in rec.refs] == rec.runs()
    assert rec.refs[1].slots.tolist() == m1[3:].tolist()
    assert sorted(rec.distinct.tolist()) == sorted(m1[[0, 1, 3, 4, 5]].tolist() + m2.tolist())
    d.check()
    d.build_row("r2", 60, [MasterRun("C", alloc.alloc(2))])  # a later region of the same row: merged, recounted
    assert [r.seg for r in d.record("r2").refs] == ["A", "A", "B", "C"] and d.record("r2").segs() == ["A", "B", "C"]
    assert d.master_refcounts()[int(m2[0])] == 2
    d.check()


def test_a_released_row_counts_the_same_kv_for_its_round_and_its_agent():
    """The cumulative KV bytes by agent add up the KV per agent of the agent's released rows: master runs divided
    among the rows served, the runs read only up to the row's allocated end."""
    from types import SimpleNamespace

    stats = TreeStats()
    seg, alone = SimpleNamespace(rows_served=4), SimpleNamespace(rows_served=1)
    stats.note_release(1, 7, 100, 40.0, [(0, 8, alone), (10, 50, seg)], 2.0)
    assert stats.kv_by_round[1][:2] == [1, pytest.approx(100 - 40 * 0.75)]
    assert stats.cum_bytes_by_agent[7] == pytest.approx(2.0 * 70)
    stats.note_release(1, 7, 30, 0.0, [(10, 50, seg), (60, 70, seg)], 2.0)  # only rows [10, 30) are in this row
    assert stats.cum_bytes_by_agent[7] == pytest.approx(2.0 * (70 + 30 - 20 * 0.75))
    assert stats.report(2.0)["kv_per_agent_by_round"]["1"]["tokens"] == pytest.approx((70 + 15) / 2)


def test_coalesce():
    assert coalesce([(5, 8), (0, 2), (2, 4), (7, 9), (10, 10)]) == [(0, 4), (5, 9)]


def test_privatize_turns_master_positions_into_owned_slots():
    alloc = make_alloc(1)
    d = DiffAllocator(alloc)
    m1, m2 = alloc.alloc(6), alloc.alloc(4)
    d.build_row("row", 10, [MasterRun("A", m1), NewRun(2), MasterRun("B", m2)])
    fresh = alloc.alloc(3)
    # positions 10 and 13 of A's run [10, 16) and the first of B's run [18, 22)
    released = d.privatize("row", [10, 13, 18], fresh)
    rec = d.record("row")
    assert [(r.start, r.end, r.seg) for r in rec.refs] == [(11, 13, "A"), (14, 16, "A"), (19, 22, "B")]
    assert rec.refs[1].slots.tolist() == m1[4:6].tolist() and rec.refs[2].slots.tolist() == m2[1:].tolist()
    assert released == [] and rec.private_tokens == 2 + 3
    assert rec.master_positions().tolist() == [11, 12, 14, 15, 19, 20, 21]
    # privatizing every remaining position of B releases it
    assert d.privatize("row", [19, 20, 21], alloc.alloc(3)) == ["B"]
    with pytest.raises(ValueError, match="not master references"):
        d.privatize("row", [16], alloc.alloc(1))
    with pytest.raises(ValueError, match="distinct"):
        d.privatize("row", [11, 11], alloc.alloc(2))


def _coalesce_by_hand(ranges):
    covered = sorted({p for a, b in ranges for p in range(a, b)})
    out = []
    for p in covered:
        if out and p <= out[-1][1]:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=30),
       st.lists(st.integers(0, 60), max_size=30))
@settings(max_examples=200, deadline=None)
def test_coalesce_equals_the_covered_positions(spans, points):
    """The vectorized union: the covered positions as maximal runs (touching runs merge), empty spans ignored."""
    ranges = [(a, a + n) for a, n in spans]
    got = coalesce(ranges, np.asarray(points, dtype=np.int64))
    assert got == _coalesce_by_hand(ranges + [(p, p + 1) for p in points])


@given(st.lists(st.integers(0, 5000), max_size=200))
@settings(max_examples=200, deadline=None)
def test_distinct_matches_unique(values):
    arr = np.asarray(values, dtype=np.int64)
    d = Distinct(16)  # grows to the largest value
    assert np.array_equal(np.sort(d.of(arr)), np.unique(arr))
    assert d.check(arr) == (len(set(values)) == len(values))
    with pytest.raises(ValueError):
        d.of(np.asarray([3, -1], dtype=np.int64))
