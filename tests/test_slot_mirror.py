"""The host-kept allocator and the row mirror (``tokendance_sgl.slot_mirror``): the same results as SGLang's own
allocator, step for step, with no read of the device."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tokendance_sgl  # noqa: F401
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from tokendance_sgl.host import DeviceReads, to_host
from tokendance_sgl.slot_mirror import RowMirror, allocating, is_host_kept, keep_on_host

SIZE, ROWS, COLS = 512, 8, 160


def _allocator(ps: int):
    if ps == 1:
        return TokenToKVPoolAllocator(size=SIZE, dtype=torch.float32, device="cpu", kvcache=None, need_sort=False)
    return PagedTokenToKVPoolAllocator(size=SIZE, page_size=ps, dtype=torch.float32, device="cpu", kvcache=None,
                                       need_sort=False)


class Twin:
    """One allocator and the request rows it filled (``rows[r]``: row r's slots)."""

    def __init__(self, ps: int, kept: bool):
        self.ps, self.alloc = ps, _allocator(ps)
        self.mirror = RowMirror(ROWS, COLS) if kept else None
        if kept:
            keep_on_host(self.alloc, self.mirror)
        self.rows: dict[int, list] = {}
        self.held: dict[int, torch.Tensor] = {}  # row -> its slots as the allocator gave them

    def extend(self, reqs: list[tuple[int, int, int]]):
        """Rows (row, prefix_len, extend_len): a prefix continues the row's own slots (a later chunk)."""
        ps = self.ps
        pre = torch.tensor([p for _, p, _ in reqs], dtype=torch.int64)
        seq = torch.tensor([p + e for _, p, e in reqs], dtype=torch.int64)
        last = torch.tensor([self.rows[r][p - 1] if p else -1 for r, p, _ in reqs], dtype=torch.int64)
        n = int(sum(e for _, _, e in reqs))
        batch = SimpleNamespace(reqs=[SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r, _, _ in reqs])
        held = {id(q) for q, (_, p, _) in zip(batch.reqs, reqs) if p}  # a later chunk holds its row already
        token = allocating.set((batch, held))
        try:
            out = self.alloc.alloc(n) if ps == 1 else self.alloc.alloc_extend(pre, pre, seq, seq, last, n)
        finally:
            allocating.reset(token)
        if out is None:
            return None
        host, off = to_host(out, torch.int64), 0
        for r, p, e in reqs:
            self.rows[r] = self.rows.get(r, [])[:p] + host[off:off + e].tolist()
            if self.mirror is not None:  # (what the hook after write_cache_indices notes)
                self.mirror.write(r, p, host[off:off + e])
            off += e
        return host.tolist()

    def decode(self, rs: list[int]):
        seq = torch.tensor([len(self.rows[r]) + 1 for r in rs], dtype=torch.int64)
        last = torch.tensor([self.rows[r][-1] for r in rs], dtype=torch.int64)
        batch = SimpleNamespace(reqs=[SimpleNamespace(kv=SimpleNamespace(req_pool_idx=r)) for r in rs])
        token = allocating.set((batch, {id(q) for q in batch.reqs}))
        try:
            out = self.alloc.alloc(len(rs)) if self.ps == 1 else self.alloc.alloc_decode(seq, seq, last)
        finally:
            allocating.reset(token)
        if out is None:
            return None
        host = to_host(out, torch.int64)
        for r, s in zip(rs, host.tolist()):
            if self.mirror is not None:
                self.mirror.decode(np.array([r]), np.array([len(self.rows[r])]), np.array([s]))
            self.rows[r].append(s)
        return host.tolist()

    def release(self, r: int, grouped: bool):
        slots = self.rows.pop(r)
        ps = self.ps
        if grouped:
            self.alloc.free_group_begin()
        if ps == 1:
            self.alloc.free(self._tensor(slots))
        else:  # whole pages: the row's pages, once each
            self.alloc.free_page_ids(self._tensor(sorted({s // ps for s in slots})))
        if grouped:
            self.alloc.free_group_end()

    def _tensor(self, values: list) -> torch.Tensor:
        from tokendance_sgl.host import remember

        t = torch.tensor(values, dtype=torch.int64)
        return remember(t, np.array(values, dtype=np.int64)) if self.mirror is not None else t

    def free_pages(self) -> list:
        return to_host(self.alloc.get_all_free_pages(), torch.int64).tolist()


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("seed", range(6))
def test_the_host_kept_allocator_gives_sglangs_results_without_reading_the_device(ps, seed):
    rng = random.Random(seed)
    stock, kept = Twin(ps, kept=False), Twin(ps, kept=True)
    assert is_host_kept(kept.alloc) and not is_host_kept(stock.alloc)
    for _ in range(120):
        live = sorted(stock.rows)
        op = rng.random()
        if op < 0.35 and len(live) < ROWS - 1:
            free_rows = [r for r in range(1, ROWS) if r not in stock.rows]
            new = [(r, 0, rng.randint(1, 20)) for r in rng.sample(free_rows, rng.randint(1, min(3, len(free_rows))))]
            more = [(r, len(stock.rows[r]), rng.randint(1, 9)) for r in live[:rng.randint(0, len(live))]
                    if len(stock.rows[r]) < COLS - 40]  # later chunks: prefixes ending anywhere in a page
            step = lambda t: t.extend(new + more)  # noqa: E731
        elif op < 0.75 and live:
            rs = [r for r in live if len(stock.rows[r]) < COLS - 2]
            step = lambda t: t.decode(rs) if rs else None  # noqa: E731
        elif live:
            r, grouped = rng.choice(live), rng.random() < 0.5
            step = lambda t: t.release(r, grouped)  # noqa: E731
        else:
            continue
        got = [step(stock)]
        with DeviceReads() as reads:
            got.append(step(kept))
        assert reads.total == 0, reads.by_caller
        assert got[0] == got[1]
        assert stock.free_pages() == kept.free_pages()
        assert stock.alloc.available_size() == kept.alloc.available_size()
        for r, slots in kept.rows.items():
            assert kept.mirror.get(r, 0, len(slots)).tolist() == slots


def test_a_row_nobody_noted_is_read_from_the_device():
    """Without the row mirror's knowledge the paged allocator reads ``last_loc`` from the device: still right."""
    stock, kept = Twin(4, kept=False), Twin(4, kept=True)
    for t in (stock, kept):
        t.extend([(1, 0, 6)])
    kept.mirror.valid[1] = 0  # forgotten
    got = [stock.decode([1])]
    req = SimpleNamespace(kv=SimpleNamespace(req_pool_idx=1))
    token = allocating.set((SimpleNamespace(reqs=[req]), {id(req)}))
    try:
        with DeviceReads() as reads:
            got.append(kept.alloc.alloc_decode(torch.tensor([7]), torch.tensor([7]), torch.tensor([kept.rows[1][-1]])))
    finally:
        allocating.reset(token)
    assert got[0] == to_host(got[1]).tolist() and reads.total == 1


def test_a_new_request_never_takes_its_row_from_an_earlier_occupant():
    """A request that did not hold its row before the allocation (its prefix is the tree's path) gets ``last_loc``
    from SGLang's argument, never from what the mirror kept of the row's previous request."""
    kept = Twin(4, kept=True)
    kept.extend([(1, 0, 6)])  # an earlier request's slots in row 1
    stale = kept.rows.pop(1)
    alloc, ps = kept.alloc, 4
    prefix_page = alloc.alloc(ps)  # the new request's prefix: the tree's page, 3 of its slots used
    last = int(to_host(prefix_page)[2])
    req = SimpleNamespace(kv=SimpleNamespace(req_pool_idx=1))
    pre, seq = torch.tensor([3]), torch.tensor([5])
    token = allocating.set((SimpleNamespace(reqs=[req]), set()))  # row 1 is new to it
    try:
        with DeviceReads() as reads:
            out = to_host(alloc.alloc_extend(pre, pre, seq, seq, torch.tensor([last]), 2)).tolist()
    finally:
        allocating.reset(token)
    assert out[0] == last + 1 and stale[2] + 1 not in out and reads.total == 1
