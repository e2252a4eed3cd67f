"""The one place where tensor values come to the host.

Scheduler-side bookkeeping (page ledger, slot mirrors, selections) lives in numpy on the host, while slot indices
and K/V scores may live on the GPU. Every conversion goes through :func:`to_host`; ``tests/test_host.py`` fails on a
bare ``.numpy()`` anywhere else in the core modules.

Most slot tensors the scheduler handles were made from values the host already has: the allocator's results (its
free list is kept on the host, :mod:`tokendance_sgl.slot_mirror`), a composed region, a radix node's value. Whoever
makes such a tensor calls :func:`remember` with its host values, and :func:`to_host` answers from them with no device
read. Only a tensor nobody remembered is copied from the device -- on a GPU that copy waits for the stream.
:class:`DeviceReads` counts those copies (by caller) while it is active, for ``benchmarks/overhead.py`` and the tests:
on a CPU every tensor that was not remembered counts, as it would be a device tensor on a GPU.

A remembered tensor must not be written in place afterwards (its host values would be stale), and its host array
is handed over: nobody writes it either. :func:`read_device` always reads the device (the invariant checks compare
the two).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["DeviceReads", "read_device", "remember", "remember_host", "to_device", "to_host"]


_CPU = torch.device("cpu")
_tally: Optional["DeviceReads"] = None  # the active DeviceReads (None: not counting)


class DeviceReads:
    """``with DeviceReads() as reads:`` counts the tensor reads from the device through :func:`to_host` inside the
    block, by the function that asked (``reads.by_caller``, ``reads.total``), and the answers given from remembered
    host values (``reads.known``). Not reentrant."""

    def __init__(self):
        self.by_caller: Counter = Counter()
        self.known = 0

    @property
    def total(self) -> int:
        return sum(self.by_caller.values())

    def __enter__(self) -> "DeviceReads":
        global _tally
        if _tally is not None:
            raise RuntimeError("DeviceReads is already counting")
        _tally = self
        return self

    def __exit__(self, *exc) -> None:
        global _tally
        _tally = None


_NP_DTYPES = {torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32)}


def remember(t: torch.Tensor, host: np.ndarray) -> torch.Tensor:
    """Records ``host`` (handed over: never written afterwards) as the values of ``t`` (same shape), for as long as
    ``t`` lives (they are kept on the tensor object itself); returns ``t``."""
    if host.shape != t.shape:
        raise ValueError(f"host values of shape {host.shape} for a tensor of shape {tuple(t.shape)}")
    t._td_host = host
    return t


def remember_host(t: torch.Tensor) -> torch.Tensor:
    """A host tensor remembered with its own memory as its values; returns it."""
    t._td_host = t.numpy()
    return t


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """``t``'s values as a host numpy array, not to be written: remembered ones, or copied from the device when it
    lives there (a view for a plain CPU tensor)."""
    v = getattr(t, "_td_host", None)
    if v is not None:
        if _tally is not None:
            _tally.known += 1
        want = v.dtype if dtype is None else (_NP_DTYPES.get(dtype) or np.dtype(str(dtype).rpartition(".")[2]))
        return v if v.dtype == want else v.astype(want)
    if _tally is not None:
        _tally.by_caller[sys._getframe(1).f_code.co_qualname] += 1
    return read_device(t, dtype)


def read_device(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """``t``'s values copied from wherever they live (never from remembered values)."""
    if type(t) is not torch.Tensor or not t.is_cpu:  # (a plain host tensor is read in place)
        t = t.to(_CPU)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().numpy()


_KINDS: dict = {}  # device (a torch.device or its name) -> its type ("cpu", "cuda", ...)


def _kind_of(device: Any) -> str:
    kind = _KINDS[device] = device.type if isinstance(device, torch.device) else torch.device(device).type
    return kind


def to_device(host: np.ndarray, device: Any) -> torch.Tensor:
    """An int64 tensor on ``device`` holding ``host``, remembered (:func:`remember`): on a GPU a non-blocking copy
    from pinned memory, which waits for nothing."""
    ok = host.dtype == np.int64 and host.flags.c_contiguous
    t = torch.from_numpy(host if ok else np.ascontiguousarray(host, dtype=np.int64))
    kind = _KINDS.get(device) or _kind_of(device)
    if kind == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif kind != "cpu":
        t = t.to(device)
    return remember(t, host)
