"""The one place where tensor values come to the host.

Scheduler-side bookkeeping (page ledger, slot mirrors, selections) lives in numpy on the host, while slot indices
and K/V scores may live on the GPU. Every conversion goes through :func:`to_host`, an explicit device-to-host copy
(a view for CPU tensors); ``tests/test_host.py`` fails on a bare ``.numpy()`` anywhere else in the core modules.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_host"]


_CPU = torch.device("cpu")


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """``t``'s values as a host numpy array (copied from the device when it lives there)."""
    if type(t) is not torch.Tensor or not t.is_cpu:  # (a plain host tensor is read in place)
        t = t.to(_CPU)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.detach().numpy()
