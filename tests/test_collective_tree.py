"""CollectiveTree: segment nodes, master/diff ownership, round-aware eviction and exact accounting.

The requests go through SGLang's own lifecycle functions (``Req.init_next_round_input`` -> ``match_kv_cache``,
``checkpoint_kv_cache``, ``release_kv_cache``) over the real CPU allocators, with a fake KV pool that stores, per
slot, the token whose KV it holds: every row a live request reads must show its own tokens, and every segment's
master must show the segment's tokens. A hypothesis state machine drives random sequences of new requests (random
prefixes, segment tables naming earlier outputs, rows composed from master runs), decode steps, finish, abort,
retraction, segment pins, evict(n), new rounds and flush against a small reference model.
"""

from __future__ import annotations

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

from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from tokendance_sgl.collective_tree import (
    CollectiveTree,
    SegmentUnavailable,
    TreeConfig,
    build_collective_tree,
)
from tokendance_sgl.diff_alloc import MasterRun, NewRun


class Sim:
    """A scheduler stand-in over one CollectiveTree with a fake KV pool (``kv[slot]`` = token whose KV it holds)."""

    def __init__(self, ps=1, pool_tokens=128, rows=8, ctx=512, config=None):
        self.ps = ps
        self.pool = ReqToTokenPool(size=rows, max_context_len=ctx, device="cpu", enable_memory_saver=False)
        if ps == 1:
            self.alloc = TokenToKVPoolAllocator(size=pool_tokens, dtype=torch.float32, device="cpu", kvcache=None,
                                                need_sort=False)
        else:
            self.alloc = PagedTokenToKVPoolAllocator(size=pool_tokens, page_size=ps, dtype=torch.float32,
                                                     device="cpu", kvcache=None, need_sort=False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.pool, token_to_kv_pool_allocator=self.alloc,
                                 page_size=ps)
        self.tree = CollectiveTree(params, config or TreeConfig(min_segment_len=4), copy_fn=self.copy,
                                   bytes_per_token=8.0)
        self.kv = np.full(pool_tokens + 2 * ps, -1, dtype=np.int64)
        self.total = self.alloc.size
        self.running: dict[str, Req] = {}
        self.n = 0

    # fake KV
    def copy(self, src, dst):
        self.kv[dst.numpy()] = self.kv[src.numpy()]

    def _alloc(self, n):
        ps = self.ps
        need = -(-n // ps) * ps
        self.alloc.evict_to_free_tokens(self.tree, need)
        out = self.alloc.alloc(need)
        return None if out is None else out[:n]

    def make(self, prompt, custom=None):
        self.n += 1
        return Req(f"q{self.n}", "", array("q", prompt), SamplingParams(max_new_tokens=256, custom_params=custom))

    def admit(self, prompt, custom=None, *, compose=False, recompute_frac=0.0, rng=None, first=7, no_insert=False,
              chunk=None):
        """Admits a request like the scheduler. With ``compose``, the row after the radix prefix is built from the
        masters of the resident segments its plan names (recomputed positions and the rest get private slots).
        ``no_insert`` sets ``req.skip_radix_cache_insert`` (nothing of the request enters the radix tree).
        ``chunk`` checkpoints the prompt at that length first, as chunked prefill does between chunks."""
        req = self.make(prompt, custom)
        req.skip_radix_cache_insert = no_insert
        req.init_next_round_input(self.tree)
        n = len(prompt)
        req.lock = self.tree.lock(req.last_node)
        if not self.pool.free_slots:
            self.tree.unlock(req.lock)
            return None
        start = req.prefix_len
        built = None
        if compose:
            pieces, pos = [], start
            for sp in req.td_plan.spans:
                if sp.kv_len <= 0 or sp.start < pos:
                    continue
                seg = self.tree.segment(sp.key)
                if seg is None or not self.tree.has_kv(seg):
                    continue
                if sp.start > pos:
                    pieces.append(NewRun(sp.start - pos))
                k = sp.kv_len
                rc = [i for i in range(k) if rng is not None and rng.random() < recompute_frac]
                pieces.append(MasterRun(seg, seg.master[:k], recompute=rc))
                pos = sp.start + k
            if pos < n:
                pieces.append(NewRun(n - pos))
            if any(isinstance(p, MasterRun) for p in pieces):
                self.pool.alloc([req])
                built = self.tree.compose_row(req, start, pieces, agent=(custom or {}).get("td_agent"))
                if built is None:
                    self.pool.free(req)
                    self.tree.on_release(req, checkpointed=False)
                    self.tree.unlock(req.lock)
                    return None
                slots = built.slots
                private = built.private_positions
        if built is None:
            slots = self._alloc(n - start)
            if slots is None:
                self.tree.unlock(req.lock)
                return None
            self.pool.alloc([req])
            private = np.arange(n - start)
        idx = req.kv.req_pool_idx
        if start:
            self.pool.write((idx, slice(0, start)), self.tree.prefix_device_indices(req))
        self.pool.write((idx, slice(start, n)), slots)
        # the forward computes KV for the private positions (recomputed and new tokens)
        toks = np.asarray(prompt[start:n], dtype=np.int64)
        self.kv[slots.numpy()[private]] = toks[private]
        req.kv.kv_allocated_len = req.kv.kv_committed_len = n
        if chunk is not None and start < chunk < n:
            req.extend_end = chunk
            checkpoint_kv_cache(req, self.tree)
            self.tree.check_invariants()
        req.extend_end = n
        req.output_ids.append(first)
        checkpoint_kv_cache(req, self.tree)
        self.running[req.rid] = req
        return req

    def decode(self, req, token):
        p = req.kv.kv_committed_len
        row = self.pool.req_to_token[req.kv.req_pool_idx]
        if self.ps == 1 or p % self.ps == 0:
            s = self._alloc(1)
            if s is None:
                return False
            row[p] = int(s[0])
        else:
            row[p] = int(row[p - 1]) + 1
        self.kv[int(row[p])] = req.output_ids[-1]
        req.kv.kv_committed_len = req.kv.kv_allocated_len = p + 1
        req.output_ids.append(token)
        return True

    def finish(self, req, *, abort=False):
        req.finished_reason = FINISH_ABORT() if abort else FINISH_LENGTH(length=len(req.output_ids))
        release_kv_cache(req, self.tree, checkpoint=True)
        del self.running[req.rid]

    def retract(self, req):
        release_kv_cache(req, self.tree, checkpoint=False)
        del self.running[req.rid]

    def flush(self):
        assert not self.running
        self.tree.reset()
        self.pool.clear() if hasattr(self.pool, "clear") else None
        self.alloc.clear()

    # ---------------------------------------------------------------- checks
    def owned_pages(self, req) -> set[int]:
        kv = req.kv
        ps = self.ps
        row = self.pool.req_to_token[kv.req_pool_idx].numpy().astype(np.int64)
        pos = np.arange(kv.cache_protected_len, kv.kv_allocated_len)
        mpos = self.tree.row_master_positions(req)
        if mpos.size:
            pos = pos[~np.isin(pos // ps, np.unique(mpos // ps))]
        return set((row[pos] // ps).tolist())

    def check(self):
        tree, ps = self.tree, self.ps
        tree.check_invariants()
        free = self.alloc.get_all_free_pages().tolist()
        assert len(free) == len(set(free)), "a page is in the free list twice"
        free = set(free)
        L = tree._ledger
        held = set(np.nonzero((L.r > 0) | (L.s > 0))[0].tolist())
        everything = set(range(1, self.total // ps + 1))
        assert not (free & held), f"tree-held pages in the free list: {sorted(free & held)[:8]}"
        owned_total = 0
        seen = set(free | held)
        for req in self.running.values():
            own = self.owned_pages(req)
            assert not (own & seen), f"{req.rid} owns pages someone else owns: {sorted(own & seen)[:8]}"
            seen |= own
            owned_total += len(own) * ps
            # every slot the row reads is allocated and holds this request's tokens
            n = req.kv.kv_committed_len
            row = self.pool.req_to_token[req.kv.req_pool_idx, :n].numpy().astype(np.int64)
            assert not (set((row // ps).tolist()) & free), f"{req.rid} reads a freed page"
            fill = np.asarray((req.origin_input_ids + req.output_ids)[:n])
            assert (self.kv[row] == fill).all(), f"{req.rid} reads foreign KV"
        assert seen == everything, f"leaked pages: {sorted(everything - seen)[:8]}"
        a, e, p = self.alloc.available_size(), tree.evictable_size(), tree.protected_size()
        assert a + e + p + owned_total == self.total, (a, e, p, owned_total, self.total)
        if not self.running:
            assert a + e + p == self.total
        for seg in tree.segments():
            if tree.has_kv(seg):
                m = seg.master.numpy()
                assert not (set((m // ps).tolist()) & free), f"master of {seg!r} freed"
                assert (self.kv[m] == np.asarray(seg.tokens[: len(m)])).all(), f"master of {seg!r} overwritten"


def T(n, start=1):
    return list(range(start, start + n))


def tbl(round_=0, agent=0, out=None, spans=(), ns=None):
    cp = {"td_round": round_, "td_agent": agent}
    if spans:
        cp.update(td_seg_ids=[s[0] for s in spans], td_seg_starts=[s[1] for s in spans],
                  td_seg_ends=[s[2] for s in spans])
    if out:
        cp["td_out_seg"] = out
    if ns is not None:
        cp["td_ns"] = ns
    return cp


def produce(sim, prompt, out_tokens, **cp):
    req = sim.admit(prompt, tbl(**cp), first=out_tokens[0])
    assert req is not None
    for t in out_tokens[1:]:
        assert sim.decode(req, t)
    sim.finish(req)
    sim.check()
    return req


# ================================================================================================ unit tests


def test_strong_segment_registered_and_outlives_its_radix_path():
    sim = Sim(ps=1, pool_tokens=64)
    prompt, out = T(20, 100), T(8, 500)
    req = produce(sim, prompt, out, round_=0, agent=3, out="r0/a3")
    seg = sim.tree.segment_for_id("r0/a3")
    assert seg is not None and seg.strong and seg.holding and seg.ids == {"r0/a3"}
    assert list(seg.tokens) == out and seg.kv_len == len(out) - 1  # the last token's KV is never computed
    assert (seg.anchor, seg.round, seg.agent) == (20, 0, 3)
    assert req.td_registered == seg.key
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
    assert sim.tree.segment_for_id("r0/a3") is None and sim.tree.known_id("r0/a3")
    assert sim.alloc.available_size() == 64
    sim.check()


def test_page_size_4_tail_page_is_transferred_to_the_segment():
    sim = Sim(ps=4, pool_tokens=64)
    prompt, out = T(10, 100), T(6, 500)  # KV rows 0..14: radix keeps [0, 12), the tail page [12, 16) is partial
    produce(sim, prompt, out, out="s")
    seg = sim.tree.segment_for_id("s")
    assert seg.kv_len == 5 and seg.anchor == 10
    assert sim.tree.segment_only_size() == 4  # the tail page left the request for the segment, not freed
    assert sim.tree.evictable_size() == 16
    assert sim.kv[seg.master.numpy()].tolist() == out[:5]
    sim.tree.evict(EvictParams(num_tokens=64))
    assert sim.alloc.available_size() == 64 and not sim.tree.segments()
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
    assert sim.tree.segments() == []
    assert sim.tree.known_id("x") and sim.tree.known_id("y")  # announced, still pending
    sim.check()


def test_weak_segments_follow_the_radix_and_pin_while_locked():
    sim = Sim(ps=1, pool_tokens=64)
    out = T(9, 700)
    produce(sim, T(12, 100), out)  # plain request: weak segment, KV shared with the radix path
    (seg,) = sim.tree.segments()
    assert not seg.strong and not seg.holding and seg.kv_len == 8 and sim.tree.has_kv(seg)
    assert sim.tree.evictable_size() == 20
    # pinning a weak segment makes it hold its pages: radix eviction then cannot free them
    sim.tree.lock_segment(seg)
    assert sim.tree.protected_size() == 8 and sim.tree.evictable_size() == 12
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert sim.tree.segment_only_size() == 8 and sim.tree.has_kv(seg)
    sim.check()
    sim.tree.unlock_segment(seg)  # last unlock: its pages die, and with them the weak segment
    assert sim.tree.segments() == [] and sim.alloc.available_size() == 64
    sim.check()
    # an unpinned weak segment is invalidated by radix eviction (no pages held beyond stock)
    produce(sim, T(12, 100), out)
    (seg,) = sim.tree.segments()
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert not sim.tree.has_kv(seg) and sim.alloc.available_size() == 64
    with pytest.raises(SegmentUnavailable):
        sim.tree.lock_segment(seg)
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
        return tree.register_segment(toks, slots, anchor=0, round=round_, seg_id=f"r{round_}/{toks[0]}")

    old, mid, new = seg(0, T(5, 100)), seg(1, T(5, 200)), seg(2, T(5, 300))
    tree.new_round(3)
    assert [tree._is_stale(s) for s in (old, mid, new)] == [True, True, False]
    # a round-3 request naming `mid` keeps it alive for this round
    r = sim.make(T(3) + list(mid.tokens) + [9], tbl(round_=3, spans=[("r1/200", 3, 8)]))
    plan = tree.plan_for(r)
    assert plan.spans[0].status == "resident" and plan.spans[0].kv_len == 5 and not tree._is_stale(mid)
    assert tree.evictable_size() == 21
    # (1) older rounds first, before any radix prefix
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 5
    assert tree.segment(old.key) is None and tree.total_size() == 16
    # (2) then radix leaves (LRU) before current-round segments
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 6
    assert tree.segment(mid.key) is mid and tree.segment(new.key) is new
    # (3) then the current round's segments, least recently used first
    tree.plan_for(sim.make(list(new.tokens), tbl(round_=3, spans=[("r2/300", 0, 5)])), force=True)
    assert tree.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 5
    assert tree.segment(mid.key) is None and tree.segment(new.key) is new
    sim.check()


def test_locked_segment_is_never_evicted_and_flush_empties_everything():
    sim = Sim(ps=1, pool_tokens=64)
    produce(sim, T(10, 100), T(6, 500), out="a")
    produce(sim, T(10, 200), T(6, 600), out="b")
    a, b = sim.tree.segment_for_id("a"), sim.tree.segment_for_id("b")
    sim.tree.lock_segment(a)
    sim.tree.new_round(10)
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert sim.tree.segment(a.key) is a and sim.tree.has_kv(a) and sim.tree.segment(b.key) is None
    assert sim.tree.protected_size() == 5 and sim.tree.evictable_size() == 0
    with pytest.raises(RuntimeError):
        sim.tree.drop_segment(a)
    sim.check()
    sim.tree.unlock_segment(a)
    with pytest.raises(RuntimeError):
        sim.tree.unlock_segment(a)
    assert sim.tree.evictable_size() == 5
    produce(sim, T(10, 300), T(6, 800), out="c")
    sim.flush()
    assert sim.tree.segments() == [] and sim.tree.total_size() == 0
    assert (sim.tree.evictable_size(), sim.tree.protected_size()) == (0, 0)
    assert sim.alloc.available_size() == 64
    assert sim.tree.known_id("c")  # the id registry survives a flush (no KV in it)
    r = sim.make(T(2) + T(6, 800), tbl(round_=11, spans=[("c", 2, 8)]))
    assert sim.tree.validate_request(r) is None and r.td_plan.spans[0].status == "evicted"
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
        return r.td_plan, err

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
    assert res.device_prefix_len == 0 and "go together" in r.td_plan.error
    assert "go together" in sim.tree.validate_request(r)
    # round bookkeeping
    assert sim.tree.current_round == 1
    sim.check()


def test_detection_in_plain_prompts():
    sim = Sim(ps=1, pool_tokens=256, config=TreeConfig(min_segment_len=6))
    a_out, b_out = T(10, 500), T(9, 700)
    produce(sim, T(12, 100), a_out)  # plain: weak segment
    produce(sim, T(12, 200), b_out, out="b")  # strong
    prompt = T(3, 40) + a_out + T(2, 60) + b_out[:7] + a_out + T(2, 80)
    r = sim.admit(prompt)
    plan = r.td_plan
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
        seg = sim.tree.segment_for_id("r0/a0")
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
        assert all(sim.tree.segment_for_id(f"r1/a{i}") is not None for i in range(3))
        sim.tree.evict(EvictParams(num_tokens=10_000))
        assert sim.alloc.available_size() == sim.total
        sim.check()


def test_compose_row_keeps_master_refs_in_the_request_range():
    """A row whose master run sits past cache_protected_len (no checkpoint in between): free_kv_row must skip the
    master slots, and release must unlock the segment."""
    sim = Sim(ps=1, pool_tokens=96)
    out = T(9, 500)
    produce(sim, T(8, 100), out, out="m")
    seg = sim.tree.segment_for_id("m")
    req = sim.make(T(4, 900) + out[:8] + T(3, 40), tbl(round_=1, spans=[("m", 4, 12)]))
    req.init_next_round_input(sim.tree)
    req.lock = sim.tree.lock(req.last_node)
    sim.pool.alloc([req])
    built = sim.tree.compose_row(req, 0, [NewRun(4), MasterRun(seg, seg.master, recompute=[0]), NewRun(3)], agent=5)
    sim.pool.write((req.kv.req_pool_idx, slice(0, 15)), built.slots)
    req.kv.kv_allocated_len = req.kv.kv_committed_len = 15
    assert seg.lock_ref == 1 and seg.row_refs == 1 and sim.tree.protected_size() == 8
    assert sim.tree.row_master_positions(req).tolist() == list(range(5, 12))
    assert sim.tree.kv_bytes_by_agent() == {5: pytest.approx(8.0 * 15)}
    avail = sim.alloc.available_size()
    release_kv_cache(req, sim.tree, checkpoint=False)  # e.g. retraction: nothing goes into the tree
    assert sim.alloc.available_size() == avail + 8  # 4 + 1 recomputed + 3 new; the 7 master slots stay
    assert seg.lock_ref == 0 and sim.tree.has_kv(seg) and not sim.tree.diff.rows
    sim.check()
    # a segment that cannot be pinned is refused before anything is allocated
    sim.tree.drop_segment(seg)
    req2 = sim.make(T(12, 300))
    req2.init_next_round_input(sim.tree)
    sim.pool.alloc([req2])
    with pytest.raises(SegmentUnavailable):
        sim.tree.compose_row(req2, 0, [MasterRun(seg, torch.tensor([1, 2]))])
    sim.pool.free(req2)
    sim.check()


def test_alias_and_reregistration():
    sim = Sim(ps=1, pool_tokens=128)
    out = T(7, 500)
    produce(sim, T(6, 100), out, out="first")
    produce(sim, T(6, 200), out, out="second")  # same content: alias of the existing node
    seg = sim.tree.segment_for_id("first")
    assert sim.tree.segment_for_id("second") is seg and seg.ids == {"first", "second"}
    assert len(sim.tree.segments()) == 1
    # a plain request with the same output makes no second node either
    produce(sim, T(6, 300), out)
    assert len(sim.tree.segments()) == 1
    sim.check()


def test_set_master_replaces_pages():
    sim = Sim(ps=1, pool_tokens=64)
    produce(sim, T(6, 100), T(7, 500), out="x")
    seg = sim.tree.segment_for_id("x")
    new = sim.alloc.alloc(seg.kv_len)
    sim.kv[new.numpy()] = np.asarray(seg.tokens[: seg.kv_len])
    sim.tree.set_master(seg, new, anchor=40)
    assert seg.anchor == 40 and seg.master.tolist() == new.tolist()
    assert sim.tree.segment_only_size() == 6
    sim.check()
    sim.tree.lock_segment(seg)
    with pytest.raises(RuntimeError):
        sim.tree.set_master(seg, new, anchor=0)
    sim.tree.unlock_segment(seg)
    sim.tree.evict(EvictParams(num_tokens=1000))
    assert sim.alloc.available_size() == 64
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
        self.sim = Sim(ps=self.PS, pool_tokens=self.POOL, rows=6)
        self.round = 0
        self.registered: dict[str, list[int]] = {}  # reference model: finished td_out_seg ids -> output tokens
        self.pins: list = []
        self.k = 0
        self.personas = [T(5 + 3 * i, 1000 * (i + 1)) for i in range(3)]

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
            assert req.td_plan.error is None, req.td_plan.error
            req._out = out
        return req

    def _end(self, req, how):
        if how == "retract":
            self.sim.retract(req)
        else:
            self.sim.finish(req, abort=how == "abort")
            if how == "finish" and req._out and not req.skip_radix_cache_insert:
                self.registered[req._out] = list(req.output_ids)

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

    @precondition(lambda self: self.sim.tree.segments())
    @rule(data=st.data())
    def pin(self, data):
        segs = [s for s in self.sim.tree.segments() if self.sim.tree.has_kv(s)]
        if segs:
            s = data.draw(st.sampled_from(segs))
            self.sim.tree.lock_segment(s)
            self.pins.append(s)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        s = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        self.sim.tree.unlock_segment(s)

    @rule(n=st.integers(1, 64))
    def evict(self, n):
        before = self.sim.alloc.available_size()
        got = self.sim.tree.evict(EvictParams(num_tokens=n)).num_tokens_evicted
        assert self.sim.alloc.available_size() == before + got

    @rule()
    def new_round(self):
        self.round += 1
        self.sim.tree.new_round(self.round)

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
            assert self.sim.tree.known_id(sid)
            seg = self.sim.tree.segment_for_id(sid)
            if seg is not None:
                assert list(seg.tokens) == toks


class TreeMachinePaged(TreeMachine):
    PS = 4
    POOL = 128


_settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = _settings
TestTreeMachinePaged = TreeMachinePaged.TestCase
TestTreeMachinePaged.settings = _settings
