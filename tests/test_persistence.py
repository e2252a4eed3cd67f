"""Persistent agent caches in the collective tree (unit level, SGLang's own lifecycle over real CPU allocators):
a composed row is inserted into the tree as master references plus the agent's own diffs; the agent's next request
continues from it at the positions it was computed for; approximate paths stay apart from exact ones."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokendance_sgl  # noqa: F401
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from tokendance_sgl.early_match import EarlyMatch
from tokendance_sgl.position_map import MasterRuns, PathPositions, PositionMap, shift_batch
from tokendance_sgl.recompute import split_rows
from tokendance_sgl.request_state import RowPlan
from tree_sim import Sim, T, produce, tbl


def _round1(sim, prompts, *, outs, keep_running=False):
    """Round-1 requests of agents naming round-0 output "r0/a0"; returns the requests (finished unless
    ``keep_running``)."""
    done = []
    for agent, (prompt, start) in prompts.items():
        cp = tbl(round_=1, agent=agent, spans=[("r0/a0", start, start + 9)], out=f"r1/a{agent}")
        req = sim.admit_reused(prompt, cp, first=outs[0])
        assert req is not None and req.td.composed, req.td
        sim.check()
        for t in outs[1:]:
            assert sim.decode(req, t)
        done.append(req)
    if keep_running:
        return done
    for req in done:
        sim.finish(req)
        sim.check()
    return done


def test_composed_row_persists_and_its_continuation_reuses_it_at_its_positions():
    sim = Sim(ps=1, pool_tokens=256)
    out0 = T(9, 500)
    produce(sim, T(6, 100), out0, round_=0, agent=0, out="r0/a0")
    seg = sim.tree.store.for_id("r0/a0")
    # agent 2 (longer private part) arrives first and opens the base; agent 1's region then runs 4 positions up
    p2, p1 = T(14, 2000), T(10, 1000)
    prompts = {2: (p2 + out0 + T(3, 60), 14), 1: (p1 + out0 + T(3, 70), 10)}
    copies_before = sim.tree.store.counters["master_copies"]
    done = _round1(sim, prompts, outs=[11, 12, 13], keep_running=True)
    r2, r1 = done
    # one copy at the base (14), completed with the segment's last token by the first row (agent 2) only
    copy = sim.tree.store.get(f"{seg.key}@14")
    assert sim.tree.store.counters["master_copies"] == copies_before + 1
    assert copy.kv_len == len(out0) == seg.kv_len + 1 and not copy.tail_pending
    assert 10 + 8 in sim.master_positions(r1).tolist()  # agent 1 reads the copy's last token
    assert r2.td.row_plan.tails and not r1.td.row_plan.tails
    read_by_r1 = sorted(sim.master_positions(r1).tolist())
    for req in done:
        sim.finish(req)
        sim.check()
    assert r1.td.registered is not None
    assert sim.tree.stats.counters["paths_inserted"] == 2
    stats = sim.tree.report()
    assert stats["rows"] == 0 and stats["cached_path_nodes_shifted"] >= 1
    # round 2 of agent 1: its whole history is a cached prefix in the sink:4 namespace, at its shifted positions
    hist = prompts[1][0] + [11, 12, 13]
    cont = sim.admit_reused(hist + T(5, 80), tbl(round_=2, agent=1))
    assert sim.cached[cont.rid] == len(hist) - 1  # nothing before the match is recomposed or recomputed
    assert not cont.td.composed and cont.td.namespace == "td:sink:4"
    assert cont.td.positions == PositionMap((10,), (4,))
    assert cont.td.positions.position_of(len(hist)) == len(hist) + 4
    # the path's master runs come with it: the continuation holds the copy's pages agent 2 holds too
    runs = cont.td.path_runs
    assert {s for _, _, s in runs} == {copy} and copy.rows_served == 2
    assert [r for a, b, _ in runs for r in range(a, b)] == read_by_r1
    sim.check()
    allocated = int(cont.kv.kv_allocated_len)
    sim.finish(cont)
    # KV per agent: the continuation's row is credited with its half of the copy it shares with agent 2's path
    assert sim.tree.stats.kv_by_round[2][:2] == [1, allocated - len(read_by_r1) / 2]
    # exactness stays separate: `full` (and any other policy) never sees the approximate path
    other = sim.admit_reused(hist + T(5, 80), {**tbl(round_=2, agent=1), "td_recompute": "none"})
    assert sim.cached[other.rid] < len(hist) - 1 and other.td.namespace == "td:none"
    sim.finish(other)
    exact = sim.admit_reused(hist + T(5, 80), {**tbl(round_=2, agent=1), "td_recompute": "full"})
    assert exact.td.namespace is None and sim.cached[exact.rid] < 10 + 9 and not exact.td.positions
    sim.finish(exact)
    # an exact row is served to every policy
    again = sim.admit_reused(hist + T(5, 80) + [7], {**tbl(round_=2, agent=1), "td_recompute": "none"})
    assert sim.cached[again.rid] == len(hist) + 5 and again.td.namespace is None
    sim.finish(again)
    sim.check()
    # the master outlives nothing it is needed for, and everything goes back when evicted
    assert sim.tree.store.has_kv(seg)
    sim.tree.evict(EvictParams(num_tokens=10_000))
    assert sim.alloc.available_size() == sim.total
    sim.check()


def test_master_is_freed_only_when_its_last_holder_lets_go():
    sim = Sim(ps=1, pool_tokens=256)
    out0 = T(9, 500)
    produce(sim, T(6, 100), out0, round_=0, agent=0, out="r0/a0")
    seg = sim.tree.store.for_id("r0/a0")
    master = seg.master.clone()
    _round1(sim, {1: (T(6, 1000) + out0 + T(3, 70), 6)}, outs=[11, 12])
    # the producer's path and the segment go; the agent's path still reads the master: its pages stay
    sim.tree.store.drop(seg)
    held = sim.tree.ledger.held_mask(master.numpy())
    assert held[4:].all(), "the agent's path holds the master slots it reads (past the sink tokens)"
    sim.check()
    sim.tree.evict(EvictParams(num_tokens=10_000))
    assert sim.alloc.available_size() == sim.total
    sim.check()


def test_a_live_row_holds_its_fresh_pages_and_locks_the_segments_it_reads():
    """Between composition and the row's insert nothing but the row's segment locks keeps the masters it reads: an
    eviction of everything else leaves them resident; the row holds only its fresh pages in the ledger."""
    sim = Sim(ps=1, pool_tokens=256)
    out0 = T(9, 500)
    produce(sim, T(6, 100), out0, round_=0, agent=0, out="r0/a0")
    prompt = T(6, 1000) + out0 + T(3, 70)
    req = sim.make(prompt, tbl(round_=1, agent=1, spans=[("r0/a0", 6, 15)], out="r1/a1"))
    req.init_next_round_input(sim.tree)
    sim.pool.alloc([req])
    loaded, _ = sim.tree.init_load_back(InitLoadBackParams(best_match_node=req.best_match_node,
                                                           host_hit_length=req.host_hit_length, req=req))
    assert loaded and req.td.composed and req.td.reads
    rec = sim.tree.diff.record(id(req.kv))
    master_slots = np.concatenate([r.slots for r in rec.refs])
    assert not np.isin(master_slots, req.td.held_pages).any()  # the row holds its fresh slots only
    sim.tree.evict(EvictParams(num_tokens=10_000))  # the producer's path and every unlocked segment may go
    assert sim.tree.ledger.held_mask(master_slots).all() and sim.tree.ledger.prot_mask(master_slots).all()
    assert all(sim.tree.store.has_kv(s) for s in req.td.reads)
    sim.check()
    sim.pool.free(req)
    sim.tree.on_release(req, checkpointed=False)
    sim.tree.evict(EvictParams(num_tokens=10_000))
    assert sim.alloc.available_size() == sim.total
    sim.check()


def test_position_map_steps_and_tensor_shift():
    m = PositionMap().with_gap(10, 4).with_gap(30, 2)
    assert m.rows == (10, 30) and m.shifts == (4, 6) and m.total == 6
    assert [m.position_of(r) for r in (9, 10, 29, 30, 31)] == [9, 14, 33, 36, 37]
    assert m.breaks_in(20, 40) == [(10, 2)] and m.breaks_in(0, 20) == [(10, 4)]
    pos = torch.arange(8, 33)
    shift_batch(pos, [m], [pos.numel()])
    assert pos.tolist() == [m.position_of(r) for r in range(8, 33)]
    # a batch: identity, a map starting at row 0, the map above (decode-like and extend-like entries mixed)
    z = PositionMap().with_gap(0, 3).with_gap(7, 1)
    rows = [[5, 6], [0, 6, 7, 40], [9, 10, 31], [2]]
    maps = [None, z, m, PositionMap()]
    pos = torch.tensor([r for rr in rows for r in rr])
    shift_batch(pos, maps, [len(rr) for rr in rows])
    assert pos.tolist() == [(p.position_of(r) if p else r) for p, rr in zip(maps, rows) for r in rr]
    assert PositionMap().with_gap(5, 0) == PositionMap()
    with pytest.raises(ValueError):
        m.with_gap(20, 1)


def test_path_positions_follow_splits_and_removal():
    class N:
        def __init__(self, id_, length, parent=None):
            self.id, self.key, self.parent = id_, [0] * length, parent

    root = N(0, 0)
    a = N(1, 40, root)
    pp = PathPositions()
    pp.record(a, 0, PositionMap().with_gap(10, 4).with_gap(30, 2))
    assert pp.map_of(a, root) == PositionMap((10, 30), (4, 6))
    # split a at 20: head (new node) keeps the first breakpoint, a the second
    head = N(2, 20, root)
    a.key, a.parent = [0] * 20, head
    pp.split(head, a, 20)
    assert pp.map_of(head, root) == PositionMap((10,), (4,))
    assert pp.map_of(a, root) == PositionMap((10, 30), (4, 6))
    pp.remove(a)
    assert pp.map_of(a, root) == PositionMap((10,), (4,)) and len(pp) == 1
    # master runs: clipped to the node, split with it, removed with it
    b = N(3, 40, root)
    pp.record(b, 10, None, [(0, 8, "s0"), (15, 35, "s1"), (42, 50, "s2"), (60, 70, "s3")])
    assert pp.runs_of(b, root) == [(5, 25, "s1"), (32, 40, "s2")]
    bh = N(4, 20, root)
    b.key, b.parent = [0] * 20, bh
    pp.split(bh, b, 20)
    assert pp.runs_of(bh, root) == [(5, 20, "s1")]
    assert pp.runs_of(b, root) == [(5, 20, "s1"), (20, 25, "s1"), (32, 40, "s2")]
    pp.remove(b)
    assert pp.runs_of(b, root) == [(5, 20, "s1")] and pp.runs_of(root, root) == []
    assert np.array_equal(np.asarray(pp.map_of(head, root).rows), [10])


def _runs_ref(runs: list, lo: int, hi) -> list:
    """The runs inside rows [lo, hi), clipped and counted from lo (a run per triple)."""
    hi = float("inf") if hi is None else hi
    return [(max(a, lo) - lo, int(min(b, hi) - lo), s) for a, b, s in runs if b > lo and a < hi]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), max_size=8), st.integers(0, 50),
       st.one_of(st.none(), st.integers(0, 60)), st.integers(0, 20))
def test_master_runs_window_shift_and_concat_match_a_list_of_triples(gaps, lo, hi, by):
    """MasterRuns keeps runs as three tuples; every operation gives the runs a list of triples would."""
    runs, pos = [], 0
    for k, (gap, n) in enumerate(gaps):  # sorted, disjoint, non-empty
        runs.append((pos + gap, pos + gap + n, f"s{k}"))
        pos += gap + n
    mr = MasterRuns.of(runs)
    assert list(mr) == runs and len(mr) == len(runs) and mr == runs
    assert mr.shifted(by) == [(a + by, b + by, s) for a, b, s in runs]
    win = mr.window(lo, hi)
    assert win == _runs_ref(runs, lo, hi)
    if hi is not None and hi > lo:  # the windows before, at and after [lo, hi) cover the rows the runs did
        rows = lambda rs: [(r, s) for a, b, s in rs for r in range(a, b)]  # noqa: E731
        whole = MasterRuns.concat([mr.window(0, lo), win.shifted(lo), mr.window(hi).shifted(hi)])
        assert rows(whole) == rows(runs) and all(a < b for a, b, _ in whole)
    again = [(a + pos, b + pos, s) for a, b, s in runs]
    assert MasterRuns.concat([mr, MasterRuns.of([]), mr.shifted(pos)]) == runs + again


def _boom(*_a, **_k):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["copy kernel", "after composition"])
def test_injected_failure_rolls_back_and_the_request_is_prefilled_normally(where):
    sim = Sim(ps=1, pool_tokens=256)
    out0 = T(9, 500)
    produce(sim, T(6, 100), out0, round_=0, agent=0, out="r0/a0")
    avail = sim.alloc.available_size()
    if where == "copy kernel":
        sim.tree.store.rerotate = _boom
    else:
        sim.tree.stats.note_load = _boom
    prompt = T(14, 2000) + out0 + T(3, 60)
    req = sim.admit_reused(prompt, tbl(round_=1, agent=1, spans=[("r0/a0", 14, 23)]))
    c = sim.tree.stats.counters
    assert req is not None and not req.td.composed and c["rollbacks"] == 1 and c["load_back_fallbacks"] == 1
    assert sim.cached[req.rid] == 0  # prefilled as if nothing were reused
    assert all(s.lock_ref == 0 for s in sim.tree.store.segments()) and not sim.tree.diff.rows
    sim.check()  # every slot the row reads holds its own tokens; no page leaked or held twice
    sim.finish(req)
    sim.check()
    sim.tree.evict(EvictParams(num_tokens=10_000))
    assert sim.alloc.available_size() == sim.total >= avail


def test_split_rows_caps_every_forward():
    rows = [(0, 10, 100), (0, 120, 125), (2, 0, 7), (3, 5, 305)]
    assert split_rows(rows, None) == [rows] and split_rows([], 64) == []
    for limit in (1, 7, 64, 500):
        parts = split_rows(rows, limit)
        assert all(sum(e - s for _, s, e in p) <= limit for p in parts)
        assert all(sum(e - s for _, s, e in p) == limit for p in parts[:-1])  # full forwards but the last
        flat = [r for p in parts for r in p]
        for i in {r[0] for r in rows}:  # each request's rows, in order, exactly once
            got = [t for j, s, e in flat if j == i for t in range(s, e)]
            assert got == [t for j, s, e in rows if j == i for t in range(s, e)]


def test_take_lead_leaves_the_rows_after_the_first_segment():
    plan = RowPlan(compute_spans=[(10, 25), (30, 31), (40, 50)], probe_start=10, lead_end=20)
    assert plan.take_lead() == (10, 20)
    assert plan.compute_spans == [(20, 25), (30, 31), (40, 50)] and plan.probe_start == 20
    assert plan.compute_tokens == 26  # the lead still counts as computed by the pre-pass
    assert plan.take_lead() is None  # taken once
    exact = RowPlan(compute_spans=[(10, 50)], probe_start=10, lead_end=50)  # `full`: the whole region
    assert exact.take_lead() == (10, 50) and exact.compute_spans == [] and exact.compute_tokens == 40
    assert RowPlan(compute_spans=[(10, 12)], probe_start=10).take_lead() is None
    with pytest.raises(ValueError, match="leading rows"):
        RowPlan(compute_spans=[(12, 20)], probe_start=10, lead_end=15)


@pytest.mark.parametrize("ps", [4, 16])
def test_pages_share_whole_master_pages_and_copy_on_write_the_rest(ps):
    """``page_size > 1``: readers whose segment starts at the same offset of a page share one copy's whole pages;
    a reader at another offset gets a copy of its own alignment; the pages a row mixes (its text next to the segment)
    are copied on write. Every row reads its own tokens (fake KV) and the pool balances, busy and idle."""
    L = 6 * ps + 3
    sim = Sim(ps=ps, pool_tokens=64 * ps)
    out0 = T(L, 500)
    produce(sim, T(ps + 2, 100), out0, round_=0, agent=0, out="r0/a0")
    # agents 2 and 1 at offset 1 of a page, agent 3 at offset 3; agent 2 (the longest private part) opens the base
    starts = {2: 3 * ps + 1, 1: 2 * ps + 1, 3: 2 * ps + 3}
    reqs = {}
    for agent, a in starts.items():
        prompt = T(a, 1000 * agent) + out0 + T(ps + 1, 60)
        req = sim.admit_reused(prompt, tbl(round_=1, agent=agent, spans=[("r0/a0", a, a + L)], out=f"r1/a{agent}"),
                               first=7)
        assert req is not None and req.td.composed, req.td
        reqs[agent] = req
        sim.check()
    copies = [s for s in sim.tree.store.segments() if s.copy_of is not None]
    assert sorted({s.key.rsplit("/", 1)[1] for s in copies}) == ["1", "3"]  # one copy per alignment
    shared = [set(sim.tree.diff.record(id(reqs[a].kv)).distinct.tolist()) for a in (1, 2)]
    assert len(shared[0] & shared[1]) >= 4 * ps  # whole pages of one copy, read by both
    counters = sim.tree.stats.counters
    assert counters["cow_pages"] >= 3 and counters["cow_tokens"] > 0
    for req in reqs.values():
        assert (sim.master_positions(req) // ps != (sim.master_positions(req) - 1) // ps).sum() >= 1
        sim.finish(req)
        sim.check()
    assert sim.tree.report()["rows"] == 0
    sim.tree.evict(EvictParams(num_tokens=10_000))
    sim.check()


def _round_of_agents(sim, out0, out1, agents, *, policy=None, clear_templates=False):
    """Round-1 rows of ``agents``, each with a private part of the same length before the round's block (r0/a0's
    and r0/a1's outputs): they share one base and read the same copies at the same offsets."""
    L0, L1 = len(out0), len(out1)
    reqs = []
    for agent in agents:
        if clear_templates:
            sim.tree.templates.clear()
        a = 12  # the private part
        prompt = T(a, 1000 * agent) + out0 + T(2, 90) + out1 + T(5, 60)
        cp = tbl(round_=1, agent=agent, spans=[("r0/a0", a, a + L0), ("r0/a1", a + L0 + 2, a + L0 + 2 + L1)],
                 out=f"r1/a{agent}")
        if policy is not None:
            cp["td_recompute"] = policy
        req = sim.admit_reused(prompt, cp, first=7)
        assert req is not None and req.td.composed, req.td
        sim.check()
        reqs.append(req)
    return reqs


@pytest.mark.parametrize("ps,policy", [(1, None), (4, None), (1, "sink:2+deviation:0.3")])
def test_the_rows_of_one_base_are_stamped_from_one_plan(ps, policy):
    """The first row of a round's base plans its region (copies, pieces, compute spans, the allocator's shape); the
    other agents at that base get the same plan stamped at their rows, and each still reads its own tokens. A plan
    whose copy went is planned again, never read."""
    out0, out1 = T(4 * ps + 3, 500), T(3 * ps + 2, 700)

    def run(clear):
        sim = Sim(ps=ps, pool_tokens=256 * ps, rows=12)
        produce(sim, T(ps + 2, 100), out0, round_=0, agent=0, out="r0/a0")
        produce(sim, T(ps + 3, 200), out1, round_=0, agent=1, out="r0/a1")
        reqs = _round_of_agents(sim, out0, out1, [2, 3, 4, 5], policy=policy, clear_templates=clear)
        rows = [(sim.master_positions(r).tolist(), r.td.row_plan.compute_spans,
                 [(it.start, it.n, it.sel_key, it.static.tolist()) for it in r.td.row_plan.select],
                 sorted(sim.tree.diff.record(id(r.kv)).distinct.tolist())) for r in reqs]
        return sim, reqs, rows

    sim, reqs, stamped = run(clear=False)
    counters = sim.tree.stats.counters
    assert counters["compositions_shared"] == 3  # agents 3, 4 and 5
    assert not any(r.td.row_plan.tails for r in reqs[1:])  # a copy's last token: computed by the first row alone
    assert bool(reqs[0].td.row_plan.tails) == (ps == 1)  # (with pages the region ends before the block's end)
    assert all(row[0] == stamped[0][0] and row[3] == stamped[0][3] for row in stamped)  # the same master slots
    if policy is not None:
        assert stamped[0][2] and all(row[2] == stamped[0][2] for row in stamped)  # one shared selection per span
    _, _, planned = run(clear=True)  # every row planned on its own: the same rows
    assert [row[:3] for row in planned[1:]] == [row[:3] for row in stamped[1:]]
    # the copies go (their rows finished, eviction): the next agent at that base plans again and reads its own KV
    for req in reqs:
        sim.finish(req)
    sim.tree.evict(EvictParams(num_tokens=10_000))
    assert not [s for s in sim.tree.store.segments() if s.copy_of is not None]
    produce(sim, T(ps + 2, 100), out0, round_=0, agent=0, out="r0/a0")
    produce(sim, T(ps + 3, 200), out1, round_=0, agent=1, out="r0/a1")
    (late,) = _round_of_agents(sim, out0, out1, [6], policy=policy)
    assert counters["compositions_shared"] == 3 and bool(late.td.row_plan.tails) == (ps == 1)
    sim.finish(late)
    sim.check()


def test_the_collective_steps_match_is_taken_at_admission_while_it_holds():
    """The collective step matches every waiting request; its admission takes that match again (no second walk of
    either namespace) unless a radix node was evicted since or a child was added where a match ended -- then it
    matches afresh and finds what the tree holds now."""
    out0, out1 = T(7, 500), T(5, 700)

    def setup():
        sim = Sim(ps=1, pool_tokens=512, rows=12)
        produce(sim, T(3, 100), out0, round_=0, agent=0, out="r0/a0")
        produce(sim, T(4, 200), out1, round_=0, agent=1, out="r0/a1")
        produce(sim, T(12, 2000), T(3, 900), round_=0, agent=2)  # agent 2's own history (its cached path)
        return sim

    def round1(sim, agent=2):
        prompt = T(12, 2000) + T(3, 900) + out0 + T(2, 90) + out1 + T(5, 60)
        cp = tbl(round_=1, agent=agent, spans=[("r0/a0", 15, 22), ("r0/a1", 24, 29)], out=f"r1/a{agent}")
        return prompt, cp, sim.make(prompt, cp)

    def row(sim, req):
        return sim.cached[req.rid], sim.master_positions(req).tolist(), req.td.row_plan.compute_spans

    # held: the admission takes the step's match and composes the same row as a request matched afresh
    sim = setup()
    prompt, cp, req = round1(sim)
    sim.tree.collector.collect([req])
    assert req.td.early.result.device_prefix_len == 14  # agent 2's history (its last token has no KV)
    shared = row(sim, sim.admit_reused(prompt, cp, req=req))
    assert sim.tree.stats.counters["matches_shared"] == 1
    control = setup()
    assert row(control, control.admit_reused(prompt, cp)) == shared
    assert control.tree.stats.counters["matches_shared"] == 0
    assert shared[0] == 29  # agent 2's history, then the composed block
    # a child added where the step's match ended: the admission matches afresh and finds it
    sim = setup()
    twin = T(12, 2000) + T(3, 900) + T(6, 3000)
    first, second = sim.make(twin), sim.make(twin)
    sim.tree.collector.collect([first, second])
    assert second.td.early is not None and second.td.early.result.device_prefix_len == 14
    sim.finish(sim.admit_reused(twin, req=first))
    got = sim.admit_reused(twin, req=second)
    assert sim.cached[got.rid] == len(twin) - 1 and sim.tree.stats.counters["matches_shared"] == 1  # `first` only
    sim.finish(got)
    # the node where the step's match ended evicted (the other paths used since, so it is the oldest leaf): the
    # admission matches afresh and reads only what is still cached
    sim = setup()
    prompt, cp, req = round1(sim)
    sim.tree.collector.collect([req])
    for toks in (T(3, 100) + out0, T(4, 200) + out1):
        sim.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", toks))))
    ended = req.td.early.result.last_device_node
    sim.tree.evict(EvictParams(num_tokens=1))
    assert ended.parent.children.get(ended.key.child_key(1)) is not ended  # gone from the tree
    sim.check()
    got = sim.admit_reused(prompt, cp, req=req)
    assert sim.tree.stats.counters["matches_shared"] == 0 and got.td.row_plan.probe_start == 12  # matched: 12
    sim.finish(got)
    sim.check()


def test_an_early_match_holds_until_the_tree_can_match_the_key_further():
    sim = Sim(ps=1, pool_tokens=128)
    tree = sim.tree

    def insert(toks):
        slots = sim.alloc.alloc(len(toks))
        done = tree.insert(InsertParams(key=RadixKey(array("q", toks)), value=slots))
        tree.token_to_kv_pool_allocator.free(slots[: done.prefix_len])  # the part the tree had already

    insert(T(6, 1))
    key = RadixKey(array("q", T(6, 1) + T(4, 50)))
    res = tree.match_prefix(MatchPrefixParams(key=key))
    early = EarlyMatch.of(key, tree._evictions, ((res, key), None), 1, res, None, PositionMap())
    assert res.device_prefix_len == 6 and early.holds(key, tree._evictions)
    insert(T(6, 1) + T(3, 90))  # another path under the node where the match ended: no longer match for this key
    assert early.holds(key, tree._evictions)
    assert not early.holds(key, tree._evictions + 1)  # an eviction since: the matched nodes may be gone
    insert(T(6, 1) + T(2, 50))  # now the key matches two tokens further
    assert not early.holds(key, tree._evictions)
    assert tree.match_prefix(MatchPrefixParams(key=key)).device_prefix_len == 8
    sim.check()


def test_the_exact_namespace_is_walked_only_where_it_can_match_as_far():
    """A reusing request's match takes the longer of its exact and its approximate namespace (the exact one on a
    tie). The exact namespace is not walked when no key inserted there under the key's first page reaches the
    approximate match; a kept match that skipped it stops holding once such a key is inserted."""
    from sglang.srt.mem_cache.common import _req_radix_key

    from tokendance_sgl.early_match import approx_namespace, best_match
    from tokendance_sgl.reuse import request_policy

    sim = Sim(ps=1, pool_tokens=256)
    tree = sim.tree
    req = sim.make(T(6, 1) + T(10, 50) + T(3, 7))
    policy = request_policy(tree, req)
    assert policy.reuses_masters

    def insert(toks, ns=None):
        slots = sim.alloc.alloc(len(toks))
        done = tree.insert(InsertParams(key=RadixKey(array("q", toks), ns), value=slots))
        tree.token_to_kv_pool_allocator.free(slots[: done.prefix_len])

    def match():
        key = _req_radix_key(tree, req, req.origin_input_ids, max_prefix_len=len(req.origin_input_ids))
        return key, best_match(tree, policy, req, key)

    insert(T(6, 1))  # the agent's first round: exact
    insert(T(6, 1) + T(10, 50), approx_namespace(None, policy))  # its composed rows since
    key, (res, ns, _, exact, alt, unwalked) = match()
    assert (res.device_prefix_len, ns, exact) == (16, approx_namespace(None, policy), None)  # exact: not walked
    early = EarlyMatch.of(key, tree._evictions, (exact, alt), 1, res, ns, PositionMap(), unwalked=unwalked)
    assert early.holds(key, tree._evictions)
    insert(T(6, 1) + T(9, 50))  # exact, shorter than the approximate match: the kept match still holds
    assert early.holds(key, tree._evictions)
    insert(T(6, 1) + T(10, 50))  # exact, as long: it wins the tie
    assert not early.holds(key, tree._evictions)
    key, (res, ns, _, exact, alt, unwalked) = match()
    assert (res.device_prefix_len, ns, unwalked) == (16, None, ()) and exact[0] is res
    # a key inserted below the root (no caller of SGLang 0.5.23 does) bounds nothing: the exact one is walked again
    tree.longest_keys.note(RadixKey(array("q", T(3, 1))), from_root=False)
    insert(T(6, 1) + T(10, 50) + T(2, 7), approx_namespace(None, policy))
    key, (res, ns, _, exact, alt, unwalked) = match()
    assert res.device_prefix_len == 18 and exact is not None and exact[0].device_prefix_len == 16
    sim.check()
    tree.reset()  # (as SGLang's flush_cache, which clears the pools too)
    assert tree.longest_keys.at_most(tree.longest_keys.first_page(key)) == 0
