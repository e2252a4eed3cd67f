"""Shared helpers of the kernels: per-layer buffer tables, RoPE frequencies, launch heuristics.

Multi-layer launches: SGLang's ``MHATokenToKVPool`` keeps one separate tensor per layer, so the Triton kernels receive
layer 0's buffer as a typed pointer plus a device int64 table of every layer's address offset from it, in units of
``unit`` elements (``unit`` = 16 when every offset allows it, which the CUDA caching allocator's 512-byte alignment
guarantees, else 1). A program reaches layer ``l`` as ``layer0 + table[l] * unit``: one launch for all layers, and the
compiler still knows the alignment (16 elements), so loads and stores vectorise (an int-to-pointer cast from raw
addresses loses that; checked in the sm_90 PTX). Plain host addresses make this work unchanged under
``TRITON_INTERPRET=1`` on CPU tensors (checked with triton 3.8). All layers must share dtype, shape, strides and device;
tables are cached per set of addresses, so steady-state calls (and CUDA-graph replays) allocate nothing.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

_TABLE_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


@dataclass(frozen=True)
class LayerSet:
    """Validated per-layer buffers ``[rows, heads, dim]`` with the table of their base addresses."""

    buffers: tuple[torch.Tensor, ...]
    table: torch.Tensor  # int64 [num_layers] on the buffers' device: (address - address of layer 0) / (unit * itemsize)
    unit: int
    num_layers: int
    rows: int
    heads: int
    dim: int
    stride_row: int
    stride_head: int
    stride_dim: int

    @property
    def first(self) -> torch.Tensor:
        return self.buffers[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.buffers[0].dtype


def as_buffer_list(buffers: Sequence[torch.Tensor] | torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
    """Accept a sequence of per-layer tensors or one stacked ``[layers, rows, heads, dim]`` tensor."""
    if isinstance(buffers, torch.Tensor):
        if buffers.dim() == 3:
            raise ValueError(f"{name}: pass a sequence of per-layer buffers (or a stacked 4-D tensor), got one 3-D tensor")
        if buffers.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D stacked tensor, got shape {tuple(buffers.shape)}")
        return tuple(buffers.unbind(0))
    out = tuple(buffers)
    if not out:
        raise ValueError(f"{name}: no layers")
    return out


def check_layers(buffers: Sequence[torch.Tensor] | torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
    """Check that all layers share dtype, shape, strides and device; return them as a tuple."""
    bufs = as_buffer_list(buffers, name)
    first = bufs[0]
    if first.dim() != 3:
        raise ValueError(f"{name}: each layer must be [rows, heads, dim], got shape {tuple(first.shape)}")
    for i, b in enumerate(bufs[1:], start=1):
        if b.dtype != first.dtype or b.shape != first.shape or b.stride() != first.stride() or b.device != first.device:
            raise ValueError(
                f"{name}[{i}] differs from {name}[0] (dtype/shape/stride/device): "
                f"{b.dtype}/{tuple(b.shape)}/{b.stride()}/{b.device} vs "
                f"{first.dtype}/{tuple(first.shape)}/{first.stride()}/{first.device}"
            )
    return bufs


def layer_set(buffers: Sequence[torch.Tensor] | torch.Tensor, name: str) -> LayerSet:
    bufs = check_layers(buffers, name)
    first = bufs[0]
    item = first.element_size()
    ptrs = tuple(b.data_ptr() for b in bufs)
    key = (str(first.device), item, ptrs)
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        diffs = [p - ptrs[0] for p in ptrs]
        if any(d % item for d in diffs):
            raise ValueError("layer buffers are not aligned to their element size")
        unit = 16 if all(d % (16 * item) == 0 for d in diffs) else 1
        table = torch.tensor([d // (unit * item) for d in diffs], dtype=torch.int64, device=first.device)
        hit = (table, unit)
        _TABLE_CACHE[key] = hit
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    rows, heads, dim = first.shape
    sr, sh, sd = first.stride()
    return LayerSet(bufs, hit[0], hit[1], len(bufs), rows, heads, dim, sr, sh, sd)


_INV_FREQ_CACHE: dict[tuple, torch.Tensor] = {}


def rope_inv_freq(rope_theta: float, rotary_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 ``theta_j = rope_theta ** (-2j / rotary_dim)``, j < rotary_dim/2, computed as SGLang's RotaryEmbedding does."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be positive and even, got {rotary_dim}")
    key = (float(rope_theta), int(rotary_dim), str(torch.device(device)))
    inv = _INV_FREQ_CACHE.get(key)
    if inv is None:
        exps = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        inv = (1.0 / (float(rope_theta) ** exps)).to(device)
        _INV_FREQ_CACHE[key] = inv
    return inv


def resolve_inv_freq(
    inv_freq: torch.Tensor | None, rope_theta: float, rotary_dim: int, device: torch.device
) -> torch.Tensor:
    """The explicit ``inv_freq`` (e.g. linear- or llama3-scaled) or the plain one from ``rope_theta``."""
    if inv_freq is None:
        return rope_inv_freq(rope_theta, rotary_dim, device)
    if inv_freq.shape != (rotary_dim // 2,):
        raise ValueError(f"inv_freq must have shape [{rotary_dim // 2}], got {tuple(inv_freq.shape)}")
    return inv_freq.to(device=device, dtype=torch.float32).contiguous()


def check_rows(name: str, t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """1-D integer index tensor (any stride); returns it unchanged."""
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 1


def block_rows(block_cols: int, itemsize: int, num_warps: int = 4) -> int:
    """Rows per program of a row-wise memory-bound kernel: enough that a [rows, block_cols] tile gives every thread a
    16-byte vector (the compiler only vectorises that far when the tile is large enough), between 16 and 64."""
    want = (num_warps * 32 * 16 // itemsize) // max(1, block_cols)
    return min(64, max(16, next_pow2(want)))


def layers_per_program(n_blocks: int, num_layers: int, device: torch.device) -> int:
    """Layers handled by one program: all of them when there are enough slot blocks to fill the GPU, else fewer so that
    the (slot block, layer group) grid still fills every SM (16 programs of 4 warps each)."""
    if device.type != "cuda":
        return num_layers
    target = 16 * num_sms(str(device))
    groups = max(1, min(num_layers, -(-target // max(1, n_blocks))))
    return -(-num_layers // groups)


@dataclass
class LaunchSpec:
    """One kernel launch, fully assembled: ``kernel[grid](*args, **kwargs)``. Launchers build it with the real
    arguments; ``aot`` compiles the same spec for a GPU target without a GPU."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def launch(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)  # type: ignore[index]
