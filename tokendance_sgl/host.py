"""The one place where tensor values come to the host.

Scheduler-side bookkeeping (page ledger, slot mirrors, selections) lives in numpy on the host, while slot indices
and K/V scores may live on the GPU. Every conversion goes through :func:`to_host`, an explicit device-to-host copy
(a view for CPU tensors); ``tests/test_host.py`` fails on a bare ``.numpy()`` anywhere else in the core modules.

On a GPU each such read waits for the device stream. :class:`DeviceReads` counts them (by caller) while it is
active, for ``benchmarks/overhead.py`` and the tests: on a CPU every read of a tensor is counted, as every tensor
that reaches ``to_host`` there would be a device tensor on a GPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Optional

import numpy as np
import torch

__all__ = ["DeviceReads", "to_host"]


_CPU = torch.device("cpu")
_tally: Optional[Counter] = None  # the active DeviceReads' counts (None: not counting)


class DeviceReads:
    """``with DeviceReads() as reads:`` counts the tensor reads through :func:`to_host` inside the block, by the
    function that asked (``reads.by_caller``; ``reads.total``). Not reentrant."""

    def __init__(self):
        self.by_caller: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_caller.values())

    def __enter__(self) -> "DeviceReads":
        global _tally
        if _tally is not None:
            raise RuntimeError("DeviceReads is already counting")
        _tally = self.by_caller
        return self

    def __exit__(self, *exc) -> None:
        global _tally
        _tally = None


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """``t``'s values as a host numpy array (copied from the device when it lives there)."""
    if _tally is not None:
        _tally[sys._getframe(1).f_code.co_qualname] += 1
    if type(t) is not torch.Tensor or not t.is_cpu:  # (a plain host tensor is read in place)
        t = t.to(_CPU)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().numpy()
