"""CollectiveTree: segment nodes, master/diff ownership, round-aware eviction and exact accounting.

The requests go through SGLang's own lifecycle functions (``Req.init_next_round_input`` -> ``match_kv_cache``,
``checkpoint_kv_cache``, ``release_kv_cache``) over the real CPU allocators, with a fake KV pool that stores, per
slot, the token whose KV it holds: every row a live request reads must show its own tokens, and every segment's
master must show the segment's tokens. A hypothesis state machine drives random sequences of new requests (random
prefixes, segment tables naming earlier outputs, rows composed from master runs), decode steps, finish, abort,
retraction, segment pins, evict(n), new rounds and flush against a small reference model.
"""

from __future__ import annotations

import os

import random
from array import array
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.srt.runtime_context import get_context, get_serving

try:
    get_serving()
except Exception:  # release_kv_cache reads the serving/spec config: publish defaults once
    get_context().override_server_args().install()

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from tokendance_sgl.backend import build_collective_tree
from tokendance_sgl.collective_tree import CollectiveTree
from tokendance_sgl.config import TreeConfig
from tokendance_sgl.diff_alloc import MasterRun, NewRun
from tokendance_sgl.segment_store import SegmentUnavailable
from tree_sim import Sim, T, new_round, produce, radix_nodes, register, tbl


# ================================================================================================ unit tests


def test_strong_segment_registered_and_outlives_its_radix_path():
    sim = Sim(ps=1, pool_tokens=64)
    prompt, out = T(20, 100), T(8, 500)
    req = produce(sim, prompt, out, round_=0, agent=3, out="r0/a3")
    seg = sim.tree.store.for_id("r0/a3")
    assert seg is not None and seg.strong and seg.holding and seg.ids == {"r0/a3"}
    assert list(seg.tokens) == out and seg.kv_len == len(out) - 1  # the last token's KV is never computed
    assert (seg.anchor, seg.round, seg.agent) == (20, 0, 3)
    assert req.td.registered == seg.key
    # the master is the radix's copy of the output (co-held: nothing is double counted)
    leaf = sim.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt + out[:-1])))).last_device_node
    assert sim.tree.path_device_indices(leaf)[20:].tolist() == seg.master.tolist()
    assert sim.tree.segment_only_size() == 0
    assert sim.tree.evictable_size() == 27 and sim.tree.protected_size() == 0
    # evicting the whole radix path keeps the segment's pages: they become segment-only
    freed = sim.tree._evict_radix(1000)
    assert freed == 20 and sim.tree.total_size() == 7 and sim.tree.segment_only_size() == 7
    sim.check()
    # a later eviction drops the segment (frees its pages); its id stays known
    assert sim.tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 7
    assert sim.tree.store.for_id("r0/a3") is None and sim.tree.store.known_id("r0/a3")
    assert sim.alloc.available_size() == 64
    sim.check()


def test_page_size_4_tail_page_is_transferred_to_the_segment():
    sim = Sim(ps=4, pool_tokens=64)
    prompt, out = T(10, 100), T(6, 500)  # KV rows 0..14: radix keeps [0, 12), the tail page [12, 16) is partial
    produce(sim, prompt, out, out="s")
    seg = sim.tree.store.for_id("s")
    assert seg.kv_len == 5 and seg.anchor == 10
    assert sim.tree.segment_only_size() == 4  # the tail page left the request for the segment, not freed
    assert sim.tree.evictable_size() == 16
    assert sim.kv[seg.master.numpy()].tolist() == out[:5]
    sim.tree.evict(EvictParams(num_tokens=64))
    assert sim.alloc.available_size() == 64 and not sim.tree.store.segments()
    sim.check()


def test_abort_retract_and_short_plain_outputs_register_nothing():
    sim = Sim(ps=1)
    r = sim.admit(T(10), tbl(out="x"))
    sim.decode(r, 5)
    sim.finish(r, abort=True)
    r = sim.admit(T(10, 50), tbl(out="y"))
    sim.decode(r, 5)
    sim.retract(r)
    r = sim.admit(T(10, 80))  # plain, output shorter than min_segment_len (4)
    sim.decode(r, 5)
    sim.finish(r)
    assert sim.tree.store.segments() == []
    assert sim.tree.store.known_id("x") and sim.tree.store.known_id("y")  # announced, still pending
    sim.check()


def test_weak_segments_follow_the_radix_and_pin_while_locked():
    sim = Sim(ps=1, pool_tokens=64)
    out = T(9, 700)
    produce(sim, T(12, 100), out)  # plain request: weak segment, KV shared with the radix path
    (seg,) = sim.tree.store.segments()
    assert not seg.strong and not seg.holding and seg.kv_len == 8 and sim.tree.store.has_kv(seg)
    assert sim.tree.evictable_size() == 20
    # pinning a weak segment makes it hold its pages: radix eviction then cannot free them
    sim.tree.store.lock(seg)
    assert sim.tree.protected_size() == 8 and sim.tree.evictable_size() == 12
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert sim.tree.segment_only_size() == 8 and sim.tree.store.has_kv(seg)
    sim.check()
    sim.tree.store.unlock(seg)  # last unlock: its pages die, and with them the weak segment
    assert sim.tree.store.segments() == [] and sim.alloc.available_size() == 64
    sim.check()
    # an unpinned weak segment is invalidated by radix eviction (no pages held beyond stock)
    produce(sim, T(12, 100), out)
    (seg,) = sim.tree.store.segments()
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert not sim.tree.store.has_kv(seg) and sim.alloc.available_size() == 64
    with pytest.raises(SegmentUnavailable):
        sim.tree.store.lock(seg)
    sim.check()


def test_round_aware_eviction_order():
    sim = Sim(ps=1, pool_tokens=64)
    tree = sim.tree
    # a plain prefix in the radix tree (most recently used last below)
    tree.insert(InsertParams(key=RadixKey(array("q", T(6, 1))), value=sim.alloc.alloc(6)))
    # segments with their own pages (e.g. masters copied to a canonical position)
    def seg(round_, toks):
        slots = sim.alloc.alloc(len(toks))
        sim.kv[slots.numpy()] = toks
        return register(tree, toks, slots, anchor=0, round=round_, seg_id=f"r{round_}/{toks[0]}")

    old, mid, new = seg(0, T(5, 100)), seg(1, T(5, 200)), seg(2, T(5, 300))
    new_round(tree, 3)
    assert [tree.store.is_stale(s) for s in (old, mid, new)] == [True, True, False]
    # a round-3 request naming `mid` keeps it alive for this round
    r = sim.make(T(3) + list(mid.tokens) + [9], tbl(round_=3, spans=[("r1/200", 3, 8)]))
    plan = tree.plan_for(r)
    assert plan.spans[0].status == "resident" and plan.spans[0].kv_len == 5 and not tree.store.is_stale(mid)
    assert tree.evictable_size() == 21
    # (1) older rounds first, before any radix prefix
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 5
    assert tree.store.get(old.key) is None and tree.total_size() == 16
    # (2) then radix leaves (LRU) before current-round segments
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 6
    assert tree.store.get(mid.key) is mid and tree.store.get(new.key) is new
    # (3) then the current round's segments, least recently used first
    tree.plan_for(sim.make(list(new.tokens), tbl(round_=3, spans=[("r2/300", 0, 5)])), force=True)
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 5
    assert tree.store.get(mid.key) is None and tree.store.get(new.key) is new
    sim.check()


def test_locked_segment_is_never_evicted_and_flush_empties_everything():
    sim = Sim(ps=1, pool_tokens=64)
    produce(sim, T(10, 100), T(6, 500), out="a")
    produce(sim, T(10, 200), T(6, 600), out="b")
    a, b = sim.tree.store.for_id("a"), sim.tree.store.for_id("b")
    sim.tree.store.lock(a)
    new_round(sim.tree, 10)
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert sim.tree.store.get(a.key) is a and sim.tree.store.has_kv(a) and sim.tree.store.get(b.key) is None
    assert sim.tree.protected_size() == 5 and sim.tree.evictable_size() == 0
    with pytest.raises(RuntimeError):
        sim.tree.store.drop(a)
    sim.check()
    sim.tree.store.unlock(a)
    with pytest.raises(RuntimeError):
        sim.tree.store.unlock(a)
    assert sim.tree.evictable_size() == 5
    produce(sim, T(10, 300), T(6, 800), out="c")
    sim.flush()
    assert sim.tree.store.segments() == [] and sim.tree.total_size() == 0
    assert (sim.tree.evictable_size(), sim.tree.protected_size()) == (0, 0)
    assert sim.alloc.available_size() == 64
    assert sim.tree.store.known_id("c")  # the id registry survives a flush (no KV in it)
    r = sim.make(T(2) + T(6, 800), tbl(round_=11, spans=[("c", 2, 8)]))
    assert sim.tree.validate_request(r) is None and r.td.plan.spans[0].status == "evicted"
    sim.check()


def test_plans_from_tables_and_errors():
    sim = Sim(ps=1, pool_tokens=128)
    out = T(8, 500)
    produce(sim, T(10, 100), out, round_=0, agent=1, out="r0/a1")
    sim.admit(T(4, 900), tbl(round_=0, agent=2, out="r0/a2"))  # still running: its id is pending
    pre = T(5, 40)

    def plan(spans, prompt=None, **kw):
        r = sim.make(prompt or pre + out + T(3, 60), tbl(round_=1, spans=spans, **kw))
        err = sim.tree.validate_request(r)
        return r.td.plan, err

    p, err = plan([("r0/a1", 5, 13)])
    assert err is None and p.source == "table" and p.round == 1
    (s,) = p.spans
    assert (s.status, s.kv_len, s.anchor, s.seg_id) == ("resident", 7, 10, "r0/a1")
    assert p.reusable_tokens == 7
    # the client dropped the last token (EOS): a prefix is accepted
    p, err = plan([("r0/a1", 5, 12)])
    assert err is None and p.spans[0].kv_len == 7
    # pending id: no error, nothing to reuse yet
    p, err = plan([("r0/a1", 5, 13), ("r0/a2", 13, 15)])
    assert err is None and [x.status for x in p.spans] == ["resident", "pending"]
    # unknown id: the request is refused
    p, err = plan([("r9/a9", 5, 13)])
    assert "unknown segment id 'r9/a9'" in err and p.spans == [] and p.error == err
    # content mismatch: recomputed (default) or refused (strict)
    p, err = plan([("r0/a1", 4, 12)])
    assert err is None and p.spans[0].status == "mismatch" and p.spans[0].kv_len == 0
    sim.tree.config.strict_content = True
    p, err = plan([("r0/a1", 4, 12)])
    assert "does not match the prompt" in err
    sim.tree.config.strict_content = False
    # another namespace: not reusable
    p, err = plan([("r0/a1", 5, 13)], ns="other")
    assert err is None and p.spans[0].status == "other-namespace"
    # malformed table: never raises in the scheduler path, the plan carries the error
    r = sim.make(pre + out, {"td_seg_ids": ["r0/a1"], "td_seg_starts": [5]})
    res = sim.tree.match_prefix(MatchPrefixParams(key=RadixKey(r.origin_input_ids), req=r))
    assert res.device_prefix_len == 0 and "go together" in r.td.plan.error
    assert "go together" in sim.tree.validate_request(r)
    # round bookkeeping
    assert sim.tree.store.current_round == 1
    sim.check()


def test_detection_in_plain_prompts():
    sim = Sim(ps=1, pool_tokens=256, config=TreeConfig(min_segment_len=6))
    a_out, b_out = T(10, 500), T(9, 700)
    produce(sim, T(12, 100), a_out)  # plain: weak segment
    produce(sim, T(12, 200), b_out, out="b")  # strong
    prompt = T(3, 40) + a_out + T(2, 60) + b_out[:7] + a_out + T(2, 80)
    r = sim.admit(prompt)
    plan = r.td.plan
    assert plan.source == "detected"
    got = [(s.start, s.end, s.status, s.kv_len) for s in plan.spans]
    assert got == [(3, 13, "resident", 9), (15, 22, "resident", 7), (22, 32, "resident", 9)]
    assert plan.spans[1].seg_id == "b"
    sim.finish(r)
    # detection off
    sim.tree.config.detect = False
    r = sim.make(prompt)
    assert sim.tree.plan_for(r).spans == []
    sim.check()


def test_compose_rows_from_masters_and_release():
    for ps in (1, 4):
        sim = Sim(ps=ps, pool_tokens=160)
        out = T(13, 500)
        produce(sim, T(8, 100), out, round_=0, agent=0, out="r0/a0")
        seg = sim.tree.store.for_id("r0/a0")
        rng = random.Random(ps)
        prompts = [T(8, 1000 * (i + 1)) + out[:12] + T(5, 60) for i in range(3)]
        reqs = []
        for i, p in enumerate(prompts):
            cp = tbl(round_=1, agent=i, spans=[("r0/a0", 8, 20)], out=f"r1/a{i}")
            r = sim.admit(p, cp, compose=True, recompute_frac=0.3, rng=rng)
            assert r is not None
            reqs.append(r)
            sim.check()
        assert seg.lock_ref == seg.row_refs
        # after the prefill checkpoint the radix holds the composed prompt, so the rows no longer pin the master
        for r in reqs:
            assert sim.decode(r, 11) and sim.decode(r, 12)
            sim.check()
        bytes_by_agent = sim.tree.kv_bytes_by_agent()
        assert set(bytes_by_agent) <= {0, 1, 2}
        for r in reqs:
            sim.finish(r)
            sim.check()
        assert seg.lock_ref == 0 and seg.row_refs == 0
        assert all(sim.tree.store.for_id(f"r1/a{i}") is not None for i in range(3))
        sim.tree.evict(EvictParams(num_tokens=10_000))
        assert sim.alloc.available_size() == sim.total
        sim.check()


def test_live_row_holds_its_composed_region_and_release_frees_only_its_own_slots():
    """A row composed at admission (cache-owned load-back: the region is below cache_protected_len) and released
    without a checkpoint (e.g. retraction): the release frees exactly the row's private slots, never a master, and
    unlocks the segment."""
    sim = Sim(ps=1, pool_tokens=96)
    out = T(9, 500)
    produce(sim, T(8, 100), out, out="m")
    seg = sim.tree.store.for_id("m")
    req = sim.make(T(4, 900) + out[:8] + T(3, 40), tbl(round_=1, spans=[("m", 4, 12)]))
    req.init_next_round_input(sim.tree)
    req.lock = sim.tree.lock(req.last_node)
    sim.pool.alloc([req])
    built = sim.tree.compose_row(req, 0, [NewRun(4), MasterRun(seg, seg.master, recompute=[0]), NewRun(3)], agent=5)
    sim.tree.write_row(req, 0, built.slots)
    req.kv.kv_allocated_len = req.kv.kv_committed_len = 15
    req.kv.cache_protected_len = 15  # the composed region is the tree's
    assert seg.lock_ref == 1 and seg.row_refs == 1
    # protected: the segment's 8 master pages and the row's own 8 (4 + 1 recomputed + 3 new); 7 pages are both
    assert sim.tree.protected_size() == 16 and sim.tree.evictable_size() == 8  # the rest of the producer path
    assert sim.master_positions(req).tolist() == list(range(5, 12))
    assert sim.tree.kv_bytes_by_agent() == {5: pytest.approx(8.0 * 15)}
    avail = sim.alloc.available_size()
    release_kv_cache(req, sim.tree, checkpoint=False)  # e.g. retraction: nothing goes into the tree
    assert sim.alloc.available_size() == avail + 8  # 4 + 1 recomputed + 3 new; the 7 master slots stay
    assert seg.lock_ref == 0 and sim.tree.store.has_kv(seg) and not sim.tree.diff.rows
    assert sim.tree.protected_size() == 0
    sim.check()
    # a segment that cannot be pinned is refused before anything is allocated
    sim.tree.store.drop(seg)
    req2 = sim.make(T(12, 300))
    req2.init_next_round_input(sim.tree)
    sim.pool.alloc([req2])
    with pytest.raises(SegmentUnavailable):
        sim.tree.compose_row(req2, 0, [MasterRun(seg, torch.tensor([1, 2]))])
    sim.pool.free(req2)
    sim.check()


@pytest.mark.parametrize("policy", ["full", "sink:2", "none"])
def test_paged_region_ends_on_a_page_boundary_when_the_last_segment_is_cut(policy):
    """Page size 16: the first segment ends inside page 0 and the second starts on page 1 but ends before page 2, so
    the region is cut at row 16. It must end there (the text between the first segment and row 16 computed with
    it): a region that ended at the first segment's end would leave SGLang's extend to continue, in place, a page
    the tree holds (found by random exploration, whose allocator then misaligned the row: a page freed twice)."""
    sim = Sim(ps=16, pool_tokens=512, rows=6, config=TreeConfig(min_segment_len=4))
    a_out, b_out = T(9, 500), T(9, 600)
    produce(sim, T(5, 1000), a_out, out="a")
    produce(sim, T(5, 2000), b_out, out="b", agent=1)
    new_round(sim.tree, 1)
    prompt = T(3, 3000) + a_out + [1, 1, 1, 1] + b_out + [2, 2]  # a at [3, 12), b at [16, 25)
    cp = {**tbl(round_=1, agent=2, spans=[("a", 3, 12), ("b", 16, 25)]), "td_recompute": policy}
    req = sim.admit_reused(prompt, cp, first=9)
    assert req is not None and sim.cached[req.rid] == 16  # the region [0, 16): page 0 whole
    sim.check()
    for t in (10, 11, 12):
        assert sim.decode(req, t)
    sim.check()
    sim.finish(req)
    sim.check()
    sim.tree.evict(EvictParams(num_tokens=10_000))
    sim.check()


def test_checkpoint_relocks_only_the_new_leaf():
    """SGLang's checkpoint unlocks the request's old path and locks its new one at once: the ledger's radix locks
    change only for the newly inserted leaf, not twice for the whole path (and the ledger still equals the nodes')."""
    sim = Sim(ps=1, pool_tokens=256)
    hist = T(40, 100)
    first = produce(sim, hist[:30], hist[30:])
    req = sim.admit(list(first.origin_input_ids) + list(first.output_ids) + T(6, 700), tbl(round_=1))
    touched = []
    for name in ("lock_radix", "unlock_radix"):
        orig = getattr(sim.tree.ledger, name)
        setattr(sim.tree.ledger, name,
                lambda pages, _o=orig, _n=name, **kw: touched.append((_n, len(pages))) or _o(pages, **kw))
    for t in T(5, 800):
        assert sim.decode(req, t)
    sim.finish(req)  # the checkpoint (unlock the old path, lock the new one), then the release's unlock
    sim.check()
    path = sum(len(n.value) for n in radix_nodes(sim.tree))
    assert touched == [("lock_radix", 5), ("unlock_radix", path)], (touched, path)


def test_alias_and_reregistration():
    sim = Sim(ps=1, pool_tokens=128)
    out = T(7, 500)
    produce(sim, T(6, 100), out, out="first")
    produce(sim, T(6, 200), out, out="second")  # same content: alias of the existing node
    seg = sim.tree.store.for_id("first")
    assert sim.tree.store.for_id("second") is seg and seg.ids == {"first", "second"}
    assert len(sim.tree.store.segments()) == 1
    # a plain request with the same output makes no second node either
    produce(sim, T(6, 300), out)
    assert len(sim.tree.store.segments()) == 1
    sim.check()


def test_factory_builds_the_tree():
    pool = ReqToTokenPool(size=2, max_context_len=32, device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(size=32, dtype=torch.float32, device="cpu", kvcache=None, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=pool, token_to_kv_pool_allocator=alloc, page_size=1)
    ctx = SimpleNamespace(server_args=SimpleNamespace(_tokendance={"kv_backend": "tokendance", "min_segment_len": 8}),
                          params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
                          disable_radix_cache=False)
    tree = build_collective_tree(ctx)
    assert isinstance(tree, CollectiveTree) and tree.config.min_segment_len == 8 and not tree.disable
    with pytest.raises(NotImplementedError):
        build_collective_tree(SimpleNamespace(**{**vars(ctx), "is_hybrid_swa": True}))
    assert build_collective_tree(SimpleNamespace(**{**vars(ctx), "disable_radix_cache": True})).disable


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("TOKENDANCE_MIN_SEGMENT_LEN", "32")
    monkeypatch.setenv("TOKENDANCE_AUTO_REGISTER", "0")
    monkeypatch.setenv("TOKENDANCE_STRICT_SEGMENTS", "yes")
    cfg = TreeConfig.from_env({"detect": "false"})
    assert (cfg.min_segment_len, cfg.auto_register, cfg.detect, cfg.strict_content) == (32, False, False, True)


# ================================================================================================ property test


class TreeMachine(RuleBasedStateMachine):
    PS = 1
    POOL = 96

    def __init__(self):
        super().__init__()
        # with pages, composed rows copy on write the row pages that mix master tokens with their own
        self.sim = Sim(ps=self.PS, pool_tokens=self.POOL, rows=6, config=TreeConfig(min_segment_len=4))
        self.round = 0
        self.registered: dict[str, list[int]] = {}  # reference model: finished td_out_seg ids -> output tokens
        self.pins: list = []
        self.k = 0
        self.personas = [T(5 + 3 * i, 1000 * (i + 1)) for i in range(3)]
        self.histories: list[list[int]] = []  # prompt + output of finished requests (an agent's next turn continues)

    # ---------------------------------------------------------------- rules
    def _new(self, data, *, compose=None):
        sim = self.sim
        prompt = list(data.draw(st.sampled_from(self.personas)))
        spans = []
        ids = sorted(self.registered)
        n_seg = data.draw(st.integers(0, min(3, len(ids))))
        for sid in (data.draw(st.permutations(ids))[:n_seg] if ids else []):
            prompt += data.draw(st.lists(st.integers(1, 50), min_size=1, max_size=3))
            toks = self.registered[sid]
            cut = data.draw(st.integers(max(1, len(toks) - 2), len(toks)))
            spans.append((sid, len(prompt), len(prompt) + cut))
            prompt += toks[:cut]
        prompt += data.draw(st.lists(st.integers(1, 50), min_size=1, max_size=6))
        self.k += 1
        out = f"r{self.round}/k{self.k}" if data.draw(st.booleans()) else None
        cp = tbl(round_=self.round, agent=self.k % 4, spans=spans, out=out)
        if compose is None:
            compose = data.draw(st.booleans())
        rng = random.Random(data.draw(st.integers(0, 10**6)))
        chunk = data.draw(st.one_of(st.none(), st.integers(1, len(prompt))))
        req = sim.admit(prompt, cp, compose=compose, recompute_frac=0.25, rng=rng,
                        first=data.draw(st.integers(1, 50)), no_insert=data.draw(st.integers(0, 3)) == 0, chunk=chunk)
        if req is not None:
            assert req.td.plan.error is None, req.td.plan.error
            req._out = out
        return req

    def _end(self, req, how):
        if how == "retract":
            self.sim.retract(req)
        else:
            self.sim.finish(req, abort=how == "abort")
            if how == "finish" and req._out and not req.skip_radix_cache_insert:
                self.registered[req._out] = list(req.output_ids)
            if how == "finish":
                self.histories = (self.histories + [list(req.origin_input_ids) + list(req.output_ids)])[-6:]

    @precondition(lambda self: self.histories)
    @rule(data=st.data(), n=st.integers(0, 4))
    def continue_history(self, data, n):
        """An agent's next turn, admitted through SGLang's load-back path: its history (cached as a persistent
        path, maybe composed and shifted), new text and segments, a policy of its own; n decode steps, an end."""
        prompt = list(data.draw(st.sampled_from(self.histories)))
        spans = []
        for sid in data.draw(st.permutations(sorted(self.registered)))[: data.draw(st.integers(0, 2))]:
            prompt += data.draw(st.lists(st.integers(1, 50), min_size=1, max_size=3))
            spans.append((sid, len(prompt), len(prompt) + len(self.registered[sid])))
            prompt += self.registered[sid]
        prompt += data.draw(st.lists(st.integers(1, 50), min_size=1, max_size=4))
        self.k += 1
        out = f"r{self.round}/k{self.k}" if data.draw(st.booleans()) else None
        cp = {**tbl(round_=self.round, agent=self.k % 4, spans=spans, out=out),
              "td_recompute": data.draw(st.sampled_from(["sink:2", "none", "full"]))}
        req = self.sim.admit_reused(prompt, cp, first=data.draw(st.integers(1, 50)))
        if req is None:
            return
        req._out = out
        for _ in range(n):
            if not self.sim.decode(req, data.draw(st.integers(1, 50))):
                break
        self._end(req, data.draw(st.sampled_from(["finish", "finish", "abort", "retract"])))

    @rule(data=st.data())
    def new_request(self, data):
        self._new(data)

    @rule(data=st.data(), n=st.integers(3, 9))
    def produce(self, data, n):
        """A whole request: admission (row composed from masters), n decode steps, finish."""
        req = self._new(data, compose=True)
        if req is not None:
            for _ in range(n):
                if not self.sim.decode(req, data.draw(st.integers(1, 50))):
                    break
            self._end(req, "finish")

    @precondition(lambda self: self.sim.running)
    @rule(data=st.data(), n=st.integers(1, 6))
    def decode(self, data, n):
        rid = data.draw(st.sampled_from(sorted(self.sim.running)))
        for _ in range(n):
            if not self.sim.decode(self.sim.running[rid], data.draw(st.integers(1, 50))):
                break

    @precondition(lambda self: self.sim.running)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sim.running)))
        self._end(self.sim.running[rid], data.draw(st.sampled_from(["finish", "finish", "abort", "retract"])))

    @precondition(lambda self: self.sim.tree.store.segments())
    @rule(data=st.data())
    def pin(self, data):
        segs = [s for s in self.sim.tree.store.segments() if self.sim.tree.store.has_kv(s)]
        if segs:
            s = data.draw(st.sampled_from(segs))
            self.sim.tree.store.lock(s)
            self.pins.append(s)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        s = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        self.sim.tree.store.unlock(s)

    @rule(n=st.integers(1, 64))
    def evict(self, n):
        before = self.sim.alloc.available_size()
        got = self.sim.tree.evict(EvictParams(num_tokens=n)).num_tokens_evicted
        assert self.sim.alloc.available_size() == before + got

    @rule()
    def new_round(self):
        self.round += 1
        new_round(self.sim.tree, self.round)

    @rule(n=st.integers(1, 128))
    def new_round_and_evict(self, n):
        self.new_round()
        self.evict(n)

    @precondition(lambda self: not self.sim.running and not self.pins)
    @rule()
    def flush(self):
        self.sim.flush()

    # ---------------------------------------------------------------- invariants
    @invariant()
    def consistent(self):
        self.sim.check()
        for sid, toks in self.registered.items():
            assert self.sim.tree.store.known_id(sid)
            seg = self.sim.tree.store.for_id(sid)
            if seg is not None:
                assert list(seg.tokens) == toks


class TreeMachinePaged(TreeMachine):
    PS = 4
    POOL = 128


class TreeMachinePaged16(TreeMachine):
    PS = 16
    POOL = 512


# Derandomized: every run explores the same 40 programs, so `make test` is reproducible. Random exploration (run with
# TOKENDANCE_EXPLORE=1, and `--hypothesis-seed=N`) found the region that ended inside a page (README, "Known issues").
_settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                     derandomize=not os.environ.get("TOKENDANCE_EXPLORE"),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = _settings
TestTreeMachinePaged = TreeMachinePaged.TestCase
TestTreeMachinePaged.settings = _settings
TestTreeMachinePaged16 = TreeMachinePaged16.TestCase
TestTreeMachinePaged16.settings = _settings


@pytest.mark.parametrize("ps", [1, 4])
def test_the_rows_host_copy_follows_a_checkpoint_that_finds_its_tokens_cached(ps):
    """Two requests compute the same prompt at once: the second's checkpoint finds it cached (SGLang frees the second
    row's duplicate slots and points the row at the tree's), and the row's host copy follows; the release that
    registers the second's output reads its slots from that copy."""
    from sglang.srt.mem_cache.common import checkpoint_kv_cache

    sim = Sim(ps=ps, pool_tokens=256)
    prompt = T(14, 100)
    a = sim.admit(prompt, tbl(out="a"), checkpoint=False)
    b = sim.admit(prompt, tbl(out="b"), checkpoint=False)
    mirror = sim.tree.row_mirror
    before = mirror.get(b.kv.req_pool_idx, 0, 12).tolist()
    checkpoint_kv_cache(a, sim.tree)
    checkpoint_kv_cache(b, sim.tree)  # finds [0, 12) cached: b's row now reads a's slots there
    after = mirror.get(b.kv.req_pool_idx, 0, 12).tolist()
    assert after != before and after == mirror.get(a.kv.req_pool_idx, 0, 12).tolist()
    sim.check()  # (the host copies equal the device rows)
    for t in T(6, 600):
        assert sim.decode(a, t) and sim.decode(b, t + 50)
    sim.finish(b)
    sim.finish(a)
    assert sim.tree.store.for_id("b") is not None and sim.tree.store.for_id("a") is not None
    sim.check()


def test_beam_search_is_refused():
    """Beam search writes and frees its member rows outside the host's copy of the slots: refused per request."""
    sim = Sim(ps=1)
    req = sim.make(T(8))
    assert sim.tree.validate_request(req) is None
    req.sampling_params.beam_width = 2
    assert "beam search" in sim.tree.validate_request(req)
