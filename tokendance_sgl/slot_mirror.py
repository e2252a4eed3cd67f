"""The slots of the KV pool as the host knows them: an allocator whose free list lives on the host, and a host copy of
the request rows (``req_to_token``), so that the scheduler's bookkeeping never waits for the device.

SGLang's KV allocators keep their free list on the device, and the rows of ``req_to_token`` are written there; the
collective tree keeps host books of slots (the page ledger, radix nodes' pages, segments' masters, composed rows).
Reading the values it needs from the device would make every composition, checkpoint and release wait for the GPU
stream. Instead:

* :func:`keep_on_host` turns the server's allocator into its host-kept variant (a subclass of the allocator's own
  class, switched in place): SGLang's own allocation code runs on host tensors -- the free list, ``alloc``,
  ``alloc_extend``/``alloc_decode`` of the paged allocator (its torch path), frees, free groups -- and every result
  is copied to the device (pinned, non-blocking) with its host values remembered (:func:`tokendance_sgl.host.remember`).
  A freed tensor's values come from what was remembered (the allocator's results, radix nodes' values, the rows'
  copies below), and are read from the device only when nobody knows them.
* :class:`RowMirror` keeps the rows the scheduler writes, for every request: positions ``[0, valid[row])`` of a row
  are known on the host. SGLang's writes are followed by hooks (``patches/row_mirror.py``: the extend's
  ``write_cache_indices``, the decode's ``alloc_for_decode``), the tree's own (a checkpoint's path, a composed region
  written at a lead's cut, privatized positions) by the tree. A write whose values nobody knows reads them once.

``CollectiveTree.check_slots`` compares both with the device (every known row; no held page in the free list).
"""

from __future__ import annotations

import contextvars
from typing import Any, Optional

import numpy as np
import torch

from tokendance_sgl.host import read_device, remember, remember_host, to_device, to_host

__all__ = ["RowMirror", "allocating", "allocating_batch", "is_host_kept", "keep_on_host", "kv_device_of", "note_decode",
           "note_extend", "remember_own_prefix", "row_mirror_of", "write_row"]

# (the batch being allocated, ids of its requests that held their row before) while SGLang's alloc_for_extend or
# alloc_for_decode runs: the paged allocator's last_loc is the slot before each row's end, which the row mirror knows
allocating: contextvars.ContextVar[Any] = contextvars.ContextVar("tokendance_allocating_batch", default=None)


def allocating_batch(batch: Any) -> tuple:
    """The value of :data:`allocating` for ``batch`` (set it before SGLang allocates the batch's rows)."""
    return batch, {id(r) for r in batch.reqs if r.kv.holds_kv}


def _on_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as a host int64 tensor (its remembered values, or read from the device)."""
    if t is None or (t.is_cpu and getattr(t, "_td_host", None) is not None and t.dtype == torch.int64):
        return t  # (a remembered host tensor: itself)
    return torch.from_numpy(to_host(t, torch.int64))


def kv_device_of(allocator: Any) -> Any:
    """Where ``allocator``'s KV (and the slot tensors) live: a host-kept allocator's ``kv_device``, else its device."""
    return getattr(allocator, "kv_device", None) or getattr(allocator, "device", "cpu")


def is_host_kept(allocator: Any) -> bool:
    """Whether ``allocator`` is host-kept (:func:`keep_on_host`)."""
    return type(allocator) in _CLASSES.values()


def _host_kept_class(base: type) -> type:
    """``base`` (an SGLang KV allocator class) with its state on the host (``device`` "cpu") and its results on
    ``kv_device``: every method is SGLang's own, called with host tensors."""

    class HostKept(base):
        __slots__ = ()  # (the allocator's class is switched in place: same layout)
        rows: Optional["RowMirror"] = None  # the request rows (for the paged allocator's decode last_loc)
        _inner = 0

        def _out(self, host: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if host is None:
                return None
            remember_host(host)
            return host if self.kv_device.type == "cpu" else to_device(host._td_host, self.kv_device)

        def alloc(self, need_size: int):
            return self._out(super().alloc(need_size))

        def _last_loc(self, last_loc, ends: np.ndarray, need: np.ndarray) -> torch.Tensor:
            """The slot before each row's ``ends`` where ``need`` (the others are never read: -1), from the row
            mirror of the batch being allocated, or from ``last_loc`` itself."""
            if not need.any():
                return torch.full((len(ends),), -1, dtype=torch.int64)
            batch, held = allocating.get() or (None, ())
            reqs = getattr(batch, "reqs", None)
            # only a row its request held before this allocation is in the mirror (a new request's row may still hold
            # an earlier request's slots there: its prefix is the tree's path)
            if self.rows is not None and reqs is not None and len(reqs) == len(ends) and all(
                    id(r) in held for r, n in zip(reqs, need) if n):
                idx = np.fromiter((r.kv.req_pool_idx for r in reqs), dtype=np.int64, count=len(reqs))
                got = self.rows.at(idx, np.where(need, ends - 1, -1))
                if got is not None:
                    return torch.from_numpy(got)
            return _on_host(last_loc)

        def alloc_extend(self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens,
                         num_new_pages=None):
            pre = np.asarray(prefix_lens_cpu, dtype=np.int64)
            last = self._last_loc(last_loc, pre, pre % self.page_size != 0)  # a prefix ending inside a page goes on
            return self._out(super().alloc_extend(prefix_lens_cpu, prefix_lens_cpu, seq_lens_cpu, seq_lens_cpu, last,
                                                  extend_num_tokens, num_new_pages))

        def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc):
            ends = np.asarray(seq_lens_cpu, dtype=np.int64) - 1  # the new token's row position
            last = self._last_loc(last_loc, ends, ends % self.page_size != 0)  # not on a new page: goes on
            return self._out(super().alloc_decode(seq_lens_cpu, seq_lens_cpu, last))

        # frees: the index tensor comes to the host (remembered values, or a device read); SGLang's own calls among
        # its methods (a free group's flush, a paged segment's pages) pass host tensors already
        def _host_free(self, fn, t, **kwargs) -> None:
            if self._inner:
                return fn(t, **kwargs)
            self._inner = 1
            try:
                fn(_on_host(t), **kwargs)
            finally:
                self._inner = 0

        def free(self, free_index):
            self._host_free(super().free, free_index)

        def free_page_ids(self, page_ids):
            self._host_free(super().free_page_ids, page_ids)

        def free_segment(self, free_index, *, start_pos: int):
            self._host_free(super().free_segment, free_index, start_pos=start_pos)

        def free_group_end(self):
            self._inner = 1
            try:
                super().free_group_end()
            finally:
                self._inner = 0

        def merge_and_sort_free(self):
            self._inner = 1  # (SGLang's merge reads get_all_free_pages: the host's list here)
            try:
                super().merge_and_sort_free()
            finally:
                self._inner = 0

        def get_all_free_pages(self):
            """The free pages (on the device, for SGLang's invariant checks; on the host inside the allocator)."""
            pages = super().get_all_free_pages()
            return None if pages is None or self._inner else pages.to(self.kv_device)

    HostKept.__name__ = HostKept.__qualname__ = f"HostKept{base.__name__}"
    return HostKept


_CLASSES: dict[type, type] = {}


def keep_on_host(allocator: Any, rows: Optional["RowMirror"] = None) -> Any:
    """Makes ``allocator`` (a plain SGLang ``TokenToKVPoolAllocator`` or ``PagedTokenToKVPoolAllocator``) host-kept,
    in place: the scheduler and the tree keep the same object. Its current free list is read once. Returns it."""
    if is_host_kept(allocator):
        allocator.rows = rows if rows is not None else allocator.rows
        return allocator
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    base = type(allocator)
    if base not in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        raise NotImplementedError(f"the tokendance and pic backends need SGLang's plain KV allocator, not {base.__name__}")
    if allocator.free_group is not None:
        raise RuntimeError("cannot keep an allocator on the host inside a free group")
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = _host_kept_class(base)
    allocator.kv_device = torch.device(allocator.device)
    allocator.device = "cpu"
    allocator.free_pages = torch.from_numpy(np.array(read_device(allocator.free_pages, torch.int64)))
    if base is TokenToKVPoolAllocator:
        allocator.release_pages = torch.from_numpy(np.array(read_device(allocator.release_pages, torch.int64)))
    else:
        allocator.use_triton_kernels = False  # SGLang's torch path, on the host
        allocator.staged_pages = [torch.from_numpy(np.array(read_device(p, torch.int64)))
                                  for p in allocator.staged_pages]
        allocator.free_page_ids_group = []
    allocator.__class__ = cls
    allocator.rows = rows
    return allocator


class RowMirror:
    """Host copy of ``req_to_token``: row ``r``'s positions ``[0, valid[r])`` are known (module docstring)."""

    def __init__(self, n_rows: int, n_cols: int):
        self.slots = np.zeros((n_rows, n_cols), dtype=np.int32)  # (as the device's; committed as rows are used)
        self.valid = np.zeros(n_rows, dtype=np.int64)

    def get(self, row: int, start: int, end: int) -> Optional[np.ndarray]:
        """Slots of ``row``'s positions ``[start, end)`` (int64), or None when not all are known."""
        if end > self.valid[row]:
            return None
        return self.slots[row, start:end].astype(np.int64)

    def at(self, rows: np.ndarray, cols: np.ndarray) -> Optional[np.ndarray]:
        """Slots at ``(rows[i], cols[i])`` (a column < 0 gives -1), or None when one is not known."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if (cols >= self.valid[rows]).any():
            return None
        return np.where(cols >= 0, self.slots[rows, np.maximum(cols, 0)], -1).astype(np.int64)

    def write(self, row: int, start: int, values: Optional[np.ndarray], end: Optional[int] = None) -> None:
        """Positions ``[start, start + len(values))`` of ``row`` now hold ``values``; None: they hold what nobody
        knows (positions ``[start, end)``), so the row is known only before ``start``."""
        if values is None:
            self.valid[row] = min(self.valid[row], start)
            return
        stop = start + len(values)
        self.slots[row, start:stop] = values
        known = int(self.valid[row])
        if start <= known < stop:
            self.valid[row] = stop

    def scatter(self, row: int, positions: np.ndarray, values: np.ndarray) -> None:
        """Positions ``positions`` (inside the known part) of ``row`` now hold ``values``."""
        if positions.size and positions.max() >= self.valid[row]:
            self.valid[row] = min(self.valid[row], int(positions.min()))
        self.slots[row, positions] = values

    def fill(self, row: int, prefix: Optional[np.ndarray], prefix_len: int, new: np.ndarray) -> None:
        """An extend wrote row ``row`` anew: ``prefix`` (``prefix_len`` slots) then ``new``."""
        self.valid[row] = 0
        if prefix_len:
            self.write(row, 0, prefix)
            if prefix is None:
                return
        self.write(row, prefix_len, new)

    def decode(self, rows: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
        """A decode step wrote ``values[i]`` at ``(rows[i], positions[i])``."""
        rows = np.asarray(rows, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        self.slots[rows, positions] = values
        at_end = self.valid[rows] == positions
        self.valid[rows[at_end]] = positions[at_end] + 1
        behind = self.valid[rows] < positions
        self.valid[rows[behind]] = np.minimum(self.valid[rows[behind]], positions[behind])

    def check(self, req_to_token: torch.Tensor, rows: Optional[list] = None) -> None:
        """Every known position of ``rows`` (default all) equals the device's (AssertionError if not)."""
        for r in (rows if rows is not None else np.nonzero(self.valid)[0].tolist()):
            n = int(self.valid[r])
            if n:
                dev = read_device(req_to_token[r, :n], torch.int64)
                assert np.array_equal(dev, self.slots[r, :n]), f"row {r}'s host copy differs from the device"


def row_mirror_of(req_to_token_pool: Any) -> Optional[RowMirror]:
    """The row mirror a collective tree attached to ``req_to_token_pool`` (None: a stock cache's pool)."""
    return getattr(req_to_token_pool, "tokendance_rows", None)


def note_extend(rows: RowMirror, out_cache_loc: torch.Tensor, req_pool_indices_cpu: Any, prefix_lens_cpu: Any,
                extend_lens_cpu: Any, prefix_tensors: list) -> None:
    """SGLang's extend wrote each request's row anew: its prefix (the tree's path, or the row's own for a later
    chunk), then its share of ``out_cache_loc`` (``write_cache_indices``)."""
    out = to_host(out_cache_loc, torch.int64)
    off = 0
    for row, pre, ext, prefix in zip(_ints(req_pool_indices_cpu), _ints(prefix_lens_cpu), _ints(extend_lens_cpu),
                                     prefix_tensors):
        rows.fill(row, to_host(prefix, torch.int64) if pre else None, pre, out[off:off + ext])
        off += ext


def _ints(v: Any) -> list:
    return v if isinstance(v, list) else v.tolist()


def note_decode(rows: RowMirror, out_cache_loc: torch.Tensor, batch: Any, token_per_req: int) -> None:
    """SGLang's decode wrote one slot at each row's end (``alloc_for_decode``, before the lengths step)."""
    idx, lens = getattr(batch, "req_pool_indices_cpu", None), getattr(batch, "seq_lens_cpu", None)
    if idx is None:
        rows.valid[:] = 0  # (nothing known about which rows changed)
        return
    idx = np.asarray(idx, dtype=np.int64)
    model = getattr(batch, "model_config", None)
    if lens is None or token_per_req != 1 or getattr(model, "is_encoder_decoder", False):
        rows.valid[idx] = np.minimum(rows.valid[idx], np.asarray(lens, dtype=np.int64) if lens is not None else 0)
        return
    rows.decode(idx, np.asarray(lens, dtype=np.int64), to_host(out_cache_loc, torch.int64))


def remember_own_prefix(req_to_token_pool: Any, req: Any, prefix: torch.Tensor) -> None:
    """``prefix`` is ``req``'s own row's first slots (a later chunk of a request holding its row): remembered from
    the row mirror."""
    rows = row_mirror_of(req_to_token_pool)
    kv = getattr(req, "kv", None)
    if rows is None or kv is None or not kv.holds_kv or prefix.numel() == 0:
        return
    host = rows.get(kv.req_pool_idx, 0, prefix.numel())
    if host is not None:
        remember(prefix, host)


def write_row(req_to_token: torch.Tensor, rows: Optional[RowMirror], idx: int, start: int, slots: torch.Tensor,
              positions: Optional[np.ndarray] = None) -> None:
    """Writes ``slots`` (remembered values: no device read) into row ``idx`` of ``req_to_token`` at
    ``[start, ...)`` (or at ``positions``) and into its host copy ``rows``."""
    row, host = req_to_token[idx], to_host(slots, torch.int64)
    if positions is None:
        row[start:start + len(host)] = slots.to(row.dtype)
    else:
        row[to_device(positions, row.device)] = slots.to(row.dtype)
    if rows is not None:
        if positions is None:
            rows.write(idx, start, host)
        else:
            rows.scatter(idx, positions, host)
