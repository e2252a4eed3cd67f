"""A scheduler stand-in for unit tests of the collective tree: SGLang's own request lifecycle functions over real CPU
allocators and a fake KV pool that stores, per slot, the token whose KV it holds."""

from __future__ import annotations

from array import array

import numpy as np
import torch

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.srt.runtime_context import get_context, get_serving

try:
    get_serving()
except Exception:  # release_kv_cache reads the serving/spec config: publish defaults once
    get_context().override_server_args().install()

from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.sampling.sampling_params import SamplingParams

from tokendance_sgl.collective_tree import CollectiveTree
from tokendance_sgl.config import TreeConfig
from tokendance_sgl.diff_alloc import MasterRun, NewRun
from tokendance_sgl.ledger import value_pages
from tokendance_sgl.host import remember, to_host
from tokendance_sgl.slot_mirror import note_extend


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
        self.tree.store.rerotate = lambda src, dst, delta: self.copy(src, dst)  # fake KV has no positions
        self.kv = np.full(pool_tokens + 2 * ps, -1, dtype=np.int64)
        self.total = self.alloc.size
        self.running: dict[str, Req] = {}
        self.cached: dict[str, int] = {}  # rid -> prefix the request found cached (composed region included)
        self.n = 0

    # fake KV
    def copy(self, src, dst):
        self.kv[dst.numpy()] = self.kv[src.numpy()]

    def _alloc(self, n):
        ps = self.ps
        need = -(-n // ps) * ps
        self.alloc.evict_to_free_tokens(self.tree, need)
        out = self.alloc.alloc(need)
        if out is None or need == n:
            return out
        return remember(out[:n], to_host(out)[:n])  # (as SGLang's paged extend allocates: exactly n, remembered)

    def make(self, prompt, custom=None):
        self.n += 1
        return Req(f"q{self.n}", "", array("q", prompt), SamplingParams(max_new_tokens=256, custom_params=custom))

    def admit(self, prompt, custom=None, *, compose=False, recompute_frac=0.0, rng=None, first=7, no_insert=False,
              chunk=None, checkpoint=True):
        """Admits a request like the scheduler. With ``compose``, the row after the radix prefix is built from the
        masters of the resident segments its plan names (recomputed positions and the rest get private slots).
        ``no_insert`` sets ``req.skip_radix_cache_insert`` (nothing of the request enters the radix tree).
        ``chunk`` checkpoints the prompt at that length first, as chunked prefill does between chunks. Without
        ``checkpoint`` the prefill's checkpoint is left to the caller (``checkpoint_kv_cache``)."""
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
            for sp in req.td.plan.spans:
                if sp.kv_len <= 0 or sp.start < pos:
                    continue
                seg = self.tree.store.get(sp.key)
                if seg is None or not self.tree.store.has_kv(seg):
                    continue
                if sp.start > pos:
                    pieces.append(NewRun(sp.start - pos))
                k = min(sp.kv_len, n - 1 - sp.start)  # the extend computes at least one token
                if k <= 0:
                    break
                rc = [i for i in range(k) if rng is not None and rng.random() < recompute_frac]
                pieces.append(MasterRun(seg, seg.master[:k], recompute=rc))
                pos = sp.start + k
            if self.ps > 1:  # the composed region ends on a page boundary (the extend allocates whole pages)
                pieces, pos = _trim_pieces(pieces, (pos - start) // self.ps * self.ps), start + (pos - start) // self.ps * self.ps
            if any(isinstance(p, MasterRun) for p in pieces):
                # init_load_back: the composed region [start, pos) becomes the tree's (cache-owned load-back)
                self.pool.alloc([req])
                built = self.tree.compose_row(req, start, pieces, agent=(custom or {}).get("td_agent"))
                rest = self._alloc(n - pos) if built is not None else None
                if rest is None:  # the load-back fails whole: the row's holds go back
                    self.pool.free(req)
                    self.tree.on_release(req, checkpointed=False)
                    self.tree.unlock(req.lock)
                    return None
                slots = torch.cat([built.slots, rest])
                private = np.concatenate([built.private_positions, np.arange(pos - start, n - start)])
                req.kv.cache_protected_len = pos
        if built is None:
            slots = self._alloc(n - start)
            if slots is None:
                self.tree.unlock(req.lock)
                return None
            self.pool.alloc([req])
            private = np.arange(n - start)
        self._write_extend(req, start, slots)
        # the forward computes KV for the private positions (recomputed and new tokens)
        toks = np.asarray(prompt[start:n], dtype=np.int64)
        self.kv[slots.numpy()[private]] = toks[private]
        req.kv.kv_allocated_len = req.kv.kv_committed_len = n
        if chunk is not None and req.kv.cache_protected_len < chunk < n:
            req.extend_end = chunk
            checkpoint_kv_cache(req, self.tree)
            self.tree.check_invariants()
        req.extend_end = n
        req.output_ids.append(first)
        if checkpoint:
            checkpoint_kv_cache(req, self.tree)
        self.running[req.rid] = req
        return req

    def admit_reused(self, prompt, custom=None, *, first=7, req=None):
        """Admits a request exactly as SGLang's scheduler does with this cache: ``match_prefix`` plans the reusable
        region (host hit), ``init_load_back`` composes it (the region becomes the tree's), the extend allocates the
        rest; the pre-pass and the extend compute the rows the row plan names and the new tokens. ``req``: a request
        :meth:`make` made already (e.g. one a collective step saw waiting)."""
        req = self.make(prompt, custom) if req is None else req
        req.init_next_round_input(self.tree)
        n = len(prompt)
        if not self.pool.free_slots:
            return None
        self.pool.alloc([req])
        pin = self.tree.lock(req.last_node)  # PrefillAdder pins the matched prefix while it loads
        if req.host_hit_length > 0:
            loaded, node = self.tree.init_load_back(
                InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req))
            req.last_node = node
            if loaded:
                req.prefix_len += loaded
                req.kv.cache_protected_len = req.prefix_len
        req.lock = self.tree.lock(req.last_node)
        self.tree.unlock(pin)
        start = req.prefix_len
        self.cached[req.rid] = start
        # SGLang's extend continues the prefix's last page in place: a composed region must end on a page boundary
        assert start % self.ps == 0, f"the cached prefix of {req.rid} ends inside a page ({start})"
        rest = self._alloc(n - start)
        if rest is None:
            self.pool.free(req)
            self.tree.on_release(req, checkpointed=False)
            self.tree.unlock(req.lock)
            return None
        idx = req.kv.req_pool_idx
        self._write_extend(req, start, rest)
        row = self.pool.req_to_token[idx].numpy().astype(np.int64)
        toks = np.asarray(prompt, dtype=np.int64)
        plan = req.td.row_plan
        for a, b in (plan.compute_spans if plan is not None else []):  # the pre-pass
            self.kv[row[a:b]] = toks[a:b]
        if plan is not None:  # what KVCollector.run_prepass does after its forward
            plan.pending = False
            for seg, _row in plan.tails:
                seg.tail_pending, seg.tail_writer = False, None
        self.kv[row[start:n]] = toks[start:n]  # the extend
        req.kv.kv_allocated_len = req.kv.kv_committed_len = n
        req.extend_end = n
        req.output_ids.append(first)
        checkpoint_kv_cache(req, self.tree)
        self.running[req.rid] = req
        return req

    def _write_extend(self, req, start, slots):
        """What SGLang's ``write_cache_indices`` does for one request (and the row mirror's hook after it)."""
        idx = req.kv.req_pool_idx
        prefix = self.tree.prefix_device_indices(req) if start else torch.empty(0, dtype=torch.int64)
        if start:
            self.pool.write((idx, slice(0, start)), prefix)
        self.pool.write((idx, slice(start, start + len(slots))), slots)
        note_extend(self.tree.row_mirror, slots, [idx], [start], [len(slots)], [prefix])

    def master_positions(self, req) -> np.ndarray:
        """Row positions of ``req`` that read a master (its diff-allocator record)."""
        rec = self.tree.diff.record(id(req.kv))
        return np.empty(0, dtype=np.int64) if rec is None else rec.master_positions()

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
        self.tree.row_mirror.decode([req.kv.req_pool_idx], [p], [int(row[p])])  # (the hook after alloc_for_decode)
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
        """The pages of the request's own range ``[cache_protected_len, allocated)`` that no tree holder holds (a
        strong segment may hold the partial last page of its output)."""
        kv = req.kv
        ps = self.ps
        row = self.pool.req_to_token[kv.req_pool_idx].numpy().astype(np.int64)
        pages = np.unique(row[np.arange(kv.cache_protected_len, kv.kv_allocated_len)] // ps)
        return set(pages[~self.tree.ledger.held_mask(pages)].tolist())

    def check(self):
        tree, ps = self.tree, self.ps
        tree.check_invariants()
        # every radix value is whole pages in row order: rows are page-aligned (the ledger's fallback is never needed)
        for x in radix_nodes(tree):
            assert x.evicted or value_pages(x.value, ps)[1], f"radix node {x.id}'s value is not whole pages"
            if not x.evicted:  # the host's slots of a path (from its pages) are the device's
                path = tree.path_device_indices(x).tolist()
                for a, b in ((0, len(path)), (len(path) // 3, max(len(path) - 1, 0)), (len(path) - 1, len(path))):
                    got = tree.radix_holds.path_slots(x, tree.root_node, len(path), max(a, 0), b)
                    assert got is not None and got.tolist() == path[max(a, 0):b], (x.id, a, b)
        free = self.alloc.get_all_free_pages().tolist()
        assert len(free) == len(set(free)), "a page is in the free list twice"
        free = set(free)
        held = set(np.nonzero(tree.ledger.tot > 0)[0].tolist())
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
        for seg in tree.store.segments():
            if tree.store.has_kv(seg):
                m = seg.master.numpy()[: seg.kv_len - int(seg.tail_pending)]  # a pending last token: a stand-in
                assert not (set((m // ps).tolist()) & free), f"master of {seg!r} freed"
                assert (self.kv[m] == np.asarray(seg.tokens[: len(m)])).all(), f"master of {seg!r} overwritten"


def _trim_pieces(pieces, n):
    """The first ``n`` positions of a composition."""
    out, left = [], n
    for p in pieces:
        if left <= 0:
            break
        if len(p) <= left:
            out.append(p)
        elif isinstance(p, MasterRun):
            out.append(MasterRun(p.seg, p.slots[:left], recompute=[o for o in p.recompute if o < left]))
        else:
            out.append(NewRun(left))
        left -= len(p)
    return out


def radix_nodes(tree) -> list:
    """Every radix node of ``tree`` below the root."""
    out, stack = [], list(tree.root_node.children.values())
    while stack:
        x = stack.pop()
        out.append(x)
        stack.extend(x.children.values())
    return out


def new_round(tree, rnd):
    """Advances the tree's current round (requests do it through their ``td_round``)."""
    tree.store.note_round(rnd)


def register(tree, tokens, slots, **kw):
    """Registers a segment directly (requests do it when they finish)."""
    return tree.store.register(tokens, slots, **kw)[0]


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
