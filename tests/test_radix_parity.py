"""CollectiveTree behaves exactly like SGLang's RadixCache for ordinary prefixes.

Re-creates the checks of SGLang's own radix-cache unit tests (insert/match/split, key limits, extra_key isolation,
lock counts moving tokens between evictable and protected, eviction freeing slots in LRU order, page alignment,
reset) against both classes, at page size 1 and 4, with SGLang's real CPU allocators. Then replays a random
multi-turn workload through SGLang's own request-lifecycle functions (``match_kv_cache`` via
``Req.init_next_round_input``, ``checkpoint_kv_cache``, ``release_kv_cache``) on both caches side by side and
requires identical match lengths, trees, slot values and accounting at every step (the CollectiveTree meanwhile
registers the plain outputs as weak segments).
"""

from __future__ import annotations

import random
from array import array

import pytest
import torch

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.srt.runtime_context import get_context, get_serving

try:
    get_serving()
except Exception:  # release_kv_cache reads the serving/spec config: publish defaults once
    get_context().override_server_args().install()

from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from tokendance_sgl.slot_mirror import note_extend
from tokendance_sgl.collective_tree import CollectiveTree, TreeConfig

CLASSES = [RadixCache, CollectiveTree]
PAGE_SIZES = [1, 4]


def make_cache(cls, ps, pool_tokens=256, rows=8, ctx=256, config=None):
    pool = ReqToTokenPool(size=rows, max_context_len=ctx, device="cpu", enable_memory_saver=False)
    if ps == 1:
        alloc = TokenToKVPoolAllocator(size=pool_tokens, dtype=torch.float32, device="cpu", kvcache=None,
                                       need_sort=False)
    else:
        alloc = PagedTokenToKVPoolAllocator(size=pool_tokens, page_size=ps, dtype=torch.float32, device="cpu",
                                            kvcache=None, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=pool, token_to_kv_pool_allocator=alloc, page_size=ps)
    if cls is CollectiveTree:
        return CollectiveTree(params, config or TreeConfig(min_segment_len=4))
    return cls(params)


def key(tokens, extra_key=None, limit=None):
    return RadixKey(array("q", tokens), extra_key=extra_key, limit=limit)


def insert(cache, tokens, extra_key=None):
    """Inserts tokens with freshly allocated slots (page-aligned length); returns the slots."""
    ps = cache.page_size
    n = len(tokens) // ps * ps
    slots = cache.token_to_kv_pool_allocator.alloc(n) if n else torch.empty(0, dtype=torch.int64)
    res = cache.insert(InsertParams(key=key(tokens, extra_key), value=slots))
    if res.prefix_len:  # the tree already had [0, prefix_len): free our duplicates, as _insert_cache does
        cache.token_to_kv_pool_allocator.free(slots[: res.prefix_len])
    return slots, res


def match(cache, tokens, extra_key=None, limit=None):
    return cache.match_prefix(MatchPrefixParams(key=key(tokens, extra_key, limit)))


def accounting(cache):
    return cache.token_to_kv_pool_allocator.available_size(), cache.evictable_size(), cache.protected_size()


def assert_idle_invariant(cache):
    a, e, p = accounting(cache)
    assert a + e + p == cache.token_to_kv_pool_allocator.size, (a, e, p)
    if isinstance(cache, CollectiveTree):
        cache.check_invariants()
        if not cache.store.n_holding:
            assert (e, p) == (cache.evictable_size_, cache.protected_size_)


@pytest.fixture(params=[(c, p) for c in CLASSES for p in PAGE_SIZES], ids=lambda cp: f"{cp[0].__name__}-ps{cp[1]}")
def cache(request):
    cls, ps = request.param
    return make_cache(cls, ps)


def T(n, start=1):
    return list(range(start, start + n))


def test_insert_and_match_basic(cache):
    ps = cache.page_size
    toks = T(3 * ps)
    slots, res = insert(cache, toks)
    assert res.prefix_len == 0
    r = match(cache, toks)
    assert r.device_prefix_len == 3 * ps
    assert cache.path_device_indices(r.last_device_node).tolist() == slots.tolist()
    assert r.last_device_node is r.last_host_node is r.best_match_node
    assert match(cache, T(2 * ps)).device_prefix_len == 2 * ps
    assert match(cache, T(3 * ps, start=500)).device_prefix_len == 0
    assert match(cache, []).device_prefix_len == 0
    # inserting the same key again matches fully and adds nothing
    _, res2 = insert(cache, toks)
    assert res2.prefix_len == 3 * ps and cache.total_size() == 3 * ps
    assert_idle_invariant(cache)


def test_partial_match_splits_without_changing_data(cache):
    ps = cache.page_size
    toks = T(4 * ps)
    slots, _ = insert(cache, toks)
    before = sorted(cache.all_values_flatten().tolist())
    r = match(cache, T(2 * ps) + [999] * ps)
    assert r.device_prefix_len == 2 * ps
    # the match ended inside the node: it was split at the boundary, data unchanged
    assert len(cache.root_node.children) == 1
    mid = next(iter(cache.root_node.children.values()))
    assert len(mid.key) == 2 * ps and len(mid.children) == 1
    assert sorted(cache.all_values_flatten().tolist()) == before
    assert cache.total_size() == 4 * ps
    # branch off the split point
    insert(cache, T(2 * ps) + T(2 * ps, start=700))
    assert len(mid.children) == 2 and cache.total_size() == 6 * ps
    assert match(cache, T(4 * ps)).device_prefix_len == 4 * ps
    assert match(cache, T(2 * ps) + T(2 * ps, start=700)).device_prefix_len == 4 * ps
    assert_idle_invariant(cache)


def test_key_limit_and_page_alignment(cache):
    ps = cache.page_size
    toks = T(6 * ps + (ps - 1))  # not page-aligned when ps > 1: the tail is not stored
    insert(cache, toks)
    assert cache.total_size() == 6 * ps
    assert match(cache, toks).device_prefix_len == 6 * ps
    # limit caps the match (rounded down to a page)
    lim = 3 * ps + (1 if ps > 1 else 0)
    assert match(cache, toks, limit=lim).device_prefix_len == 3 * ps
    assert match(cache, toks[: ps + ps // 2 + 1]).device_prefix_len == (ps + ps // 2 + 1) // ps * ps
    assert_idle_invariant(cache)


def test_extra_key_isolation(cache):
    ps = cache.page_size
    toks = T(2 * ps)
    insert(cache, toks, extra_key="lora-a")
    assert match(cache, toks, extra_key="lora-a").device_prefix_len == 2 * ps
    assert match(cache, toks).device_prefix_len == 0
    assert match(cache, toks, extra_key="lora-b").device_prefix_len == 0
    insert(cache, toks, extra_key="lora-b")
    assert cache.total_size() == 4 * ps
    assert match(cache, toks, extra_key="lora-b").device_prefix_len == 2 * ps
    assert_idle_invariant(cache)


def test_lock_ref_moves_tokens_between_evictable_and_protected(cache):
    ps = cache.page_size
    insert(cache, T(4 * ps))
    insert(cache, T(2 * ps) + T(3 * ps, start=800))  # shares the first 2 pages
    total = 7 * ps
    assert (cache.evictable_size(), cache.protected_size()) == (total, 0)
    leaf_a = match(cache, T(4 * ps)).last_device_node
    leaf_b = match(cache, T(2 * ps) + T(3 * ps, start=800)).last_device_node
    lock_a = cache.lock(leaf_a)
    assert (cache.evictable_size(), cache.protected_size()) == (total - 4 * ps, 4 * ps)
    lock_b = cache.lock(leaf_b)
    assert (cache.evictable_size(), cache.protected_size()) == (0, total)
    lock_a2 = cache.lock(leaf_a)  # a second holder changes nothing
    assert (cache.evictable_size(), cache.protected_size()) == (0, total)
    cache.unlock(lock_a)
    cache.unlock(lock_b)
    assert (cache.evictable_size(), cache.protected_size()) == (3 * ps, 4 * ps)
    cache.unlock(lock_a2)
    assert (cache.evictable_size(), cache.protected_size()) == (total, 0)
    # inc/dec return the change of the evictable size
    assert cache.inc_lock_ref(leaf_b).delta == -5 * ps
    assert cache.dec_lock_ref(leaf_b).delta == 5 * ps
    assert_idle_invariant(cache)


def test_evict_frees_slots_lru_and_respects_locks(cache):
    ps = cache.page_size
    alloc = cache.token_to_kv_pool_allocator
    a_slots, _ = insert(cache, T(2 * ps, start=10))
    b_slots, _ = insert(cache, T(2 * ps, start=100))
    c_slots, _ = insert(cache, T(2 * ps, start=200))
    match(cache, T(2 * ps, start=10))  # touch A: B is now least recently used
    avail = alloc.available_size()
    res = cache.evict(EvictParams(num_tokens=1))
    assert res.num_tokens_evicted == 2 * ps  # a whole leaf goes
    assert alloc.available_size() == avail + 2 * ps
    assert match(cache, T(2 * ps, start=100)).device_prefix_len == 0
    assert match(cache, T(2 * ps, start=10)).device_prefix_len == 2 * ps
    freed = set(alloc.get_all_free_pages().tolist())
    assert {int(s) // ps for s in b_slots} <= freed
    # a locked node is never evicted
    lk = cache.lock(match(cache, T(2 * ps, start=200)).last_device_node)
    res = cache.evict(EvictParams(num_tokens=100 * ps))
    assert res.num_tokens_evicted == 2 * ps and cache.total_size() == 2 * ps
    assert match(cache, T(2 * ps, start=200)).device_prefix_len == 2 * ps
    assert (cache.evictable_size(), cache.protected_size()) == (0, 2 * ps)
    cache.unlock(lk)
    assert cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 2 * ps
    assert cache.total_size() == 0 and alloc.available_size() == alloc.size
    assert cache.evict(EvictParams(num_tokens=5)).num_tokens_evicted == 0
    assert_idle_invariant(cache)


def test_evict_cascades_to_parents(cache):
    ps = cache.page_size
    insert(cache, T(2 * ps))
    insert(cache, T(ps) + T(ps, start=900))  # splits: root -> [ps] -> {A, B}
    assert cache.evict(EvictParams(num_tokens=3 * ps)).num_tokens_evicted == 3 * ps
    assert cache.total_size() == 0
    assert_idle_invariant(cache)


def test_reset_clears_everything(cache):
    ps = cache.page_size
    insert(cache, T(3 * ps))
    cache.lock(match(cache, T(3 * ps)).last_device_node)
    cache.reset()
    cache.token_to_kv_pool_allocator.clear()
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (0, 0, 0)
    assert match(cache, T(3 * ps)).device_prefix_len == 0
    assert_idle_invariant(cache)


def test_insert_without_value_uses_token_ids():
    for cls in CLASSES:
        c = make_cache(cls, 1)
        c.insert(InsertParams(key=key([1, 2, 3])))
        c.insert(InsertParams(key=key([1, 2, 4, 5])))
        assert c.total_size() == 5
        assert sorted(c.all_values_flatten().tolist()) == [1, 2, 3, 4, 5]
        assert match(c, [1, 2, 4, 5, 6]).device_prefix_len == 4


def test_disabled_cache_matches_nothing():
    for cls in CLASSES:
        pool = ReqToTokenPool(size=2, max_context_len=16, device="cpu", enable_memory_saver=False)
        alloc = TokenToKVPoolAllocator(size=16, dtype=torch.float32, device="cpu", kvcache=None, need_sort=False)
        params = CacheInitParams(disable=True, req_to_token_pool=pool, token_to_kv_pool_allocator=alloc, page_size=1)
        c = cls(params) if cls is RadixCache else CollectiveTree(params, TreeConfig())
        assert c.insert(InsertParams(key=key([1, 2]))).prefix_len == 0
        assert match(c, [1, 2, 3]).device_prefix_len == 0
        assert c.evict(EvictParams(num_tokens=3)).num_tokens_evicted == 0
        assert (c.evictable_size(), c.protected_size()) == (0, 0)


# -------------------------------------------------------------------------------------------------- lifecycle


class Driver:
    """Replays what the scheduler does with SGLang's own functions (no model): admission through
    ``Req.init_next_round_input`` + lock + row allocation, a checkpoint after prefill, one slot per decode step,
    ``release_kv_cache`` at finish."""

    def __init__(self, cache):
        self.cache = cache
        self.alloc = cache.token_to_kv_pool_allocator
        self.pool = cache.req_to_token_pool
        self.ps = cache.page_size
        self.running: dict[str, Req] = {}

    def _alloc(self, n):
        need = -(-n // self.ps) * self.ps
        self.alloc.evict_to_free_tokens(self.cache, need)
        out = self.alloc.alloc(need)
        return None if out is None else out[:n]

    def admit(self, rid, prompt, custom=None, first=1):
        req = Req(rid, "", array("q", prompt), SamplingParams(max_new_tokens=64, custom_params=custom))
        req.init_next_round_input(self.cache)
        n = len(prompt)
        req.lock = self.cache.lock(req.last_node)
        slots = self._alloc(n - req.prefix_len)
        if slots is None or not self.pool.free_slots:
            if slots is not None:
                self.alloc.free(slots)
            self.cache.unlock(req.lock)
            return None
        self.pool.alloc([req])
        idx = req.kv.req_pool_idx
        prefix = self.cache.prefix_device_indices(req) if req.prefix_len else torch.empty(0, dtype=torch.int64)
        if req.prefix_len:
            self.pool.write((idx, slice(0, req.prefix_len)), prefix)
        self.pool.write((idx, slice(req.prefix_len, n)), slots)
        if getattr(self.cache, "row_mirror", None) is not None:  # (the hook after SGLang's write_cache_indices)
            note_extend(self.cache.row_mirror, slots, [idx], [req.prefix_len], [n - req.prefix_len], [prefix])
        req.kv.kv_allocated_len = req.kv.kv_committed_len = n
        req.extend_end = n
        req.output_ids.append(first)
        checkpoint_kv_cache(req, self.cache)
        self.running[rid] = req
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
        if getattr(self.cache, "row_mirror", None) is not None:  # (the hook after SGLang's alloc_for_decode)
            self.cache.row_mirror.decode([req.kv.req_pool_idx], [p], [int(row[p])])
        req.kv.kv_committed_len = req.kv.kv_allocated_len = p + 1
        req.output_ids.append(token)
        return True

    def finish(self, req):
        req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        release_kv_cache(req, self.cache, checkpoint=True)
        del self.running[req.rid]


def tree_dump(cache):
    out = []
    stack = [(cache.root_node, ())]
    while stack:
        node, path = stack.pop()
        for child in node.children.values():
            p = path + tuple(child.key.token_ids)
            out.append((p, tuple(child.value.tolist()), child.lock_ref))
            stack.append((child, p))
    return sorted(out)


@pytest.mark.parametrize("ps", PAGE_SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiturn_workload_parity(ps, seed):
    """Same random multi-turn chat workload (shared system prompts, continuing conversations, memory pressure)
    on both caches: identical cached tokens, trees, slot values and accounting at every step."""
    rng = random.Random(seed)
    pool_tokens = 192 if ps == 1 else 256
    caches = [make_cache(RadixCache, ps, pool_tokens, rows=6, ctx=512),
              make_cache(CollectiveTree, ps, pool_tokens, rows=6, ctx=512)]
    drivers = [Driver(c) for c in caches]
    systems = [T(rng.randrange(3, 20), start=1000 * (i + 1)) for i in range(3)]
    convs: dict[int, list[int]] = {}
    cached = [[], []]
    n = 0
    for step in range(160):
        op = rng.random()
        running = list(drivers[0].running)
        if op < 0.35 and len(running) < 4:
            cid = rng.randrange(6)
            hist = convs.get(cid) or list(rng.choice(systems))
            prompt = hist + [rng.randrange(1, 900) for _ in range(rng.randrange(1, 12))]
            n += 1
            reqs = [d.admit(f"q{n}", prompt) for d in drivers]
            assert (reqs[0] is None) == (reqs[1] is None)
            if reqs[0] is not None:
                assert reqs[0].prefix_len == reqs[1].prefix_len
                assert reqs[0].kv.cache_protected_len == reqs[1].kv.cache_protected_len
                for k in (0, 1):
                    cached[k].append(reqs[k].prefix_len)
                convs[cid] = prompt
                reqs[0]._cid = reqs[1]._cid = cid
        elif op < 0.8 and running:
            rid = rng.choice(running)
            tok = rng.randrange(1, 900)
            oks = [d.decode(d.running[rid], tok) for d in drivers]
            assert oks[0] == oks[1]
        elif running:
            rid = rng.choice(running)
            reqs = [d.running[rid] for d in drivers]
            convs[reqs[0]._cid] = list(reqs[0].origin_input_ids) + list(reqs[0].output_ids)
            for d, r in zip(drivers, reqs):
                d.finish(r)
        # identical state
        assert tree_dump(caches[0]) == tree_dump(caches[1])
        assert accounting(caches[0]) == accounting(caches[1])
        assert caches[0].evictable_size_ == caches[1].evictable_size_
        caches[1].check_invariants()
        if not drivers[0].running:
            for c in caches:
                assert_idle_invariant(c)
    for d in drivers:
        for r in list(d.running.values()):
            d.finish(r)
    for c in caches:
        assert_idle_invariant(c)
    assert cached[0] == cached[1] and sum(cached[0]) > 0
    # the collective tree registered plain outputs as (weak) segments without changing anything above
    assert caches[1].report()["weak"] > 0 and caches[1].store.n_holding == 0
