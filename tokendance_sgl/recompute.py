"""Worker side of selective recompute: the replay forward inside a request's row, the probe, the position shift.

A request whose row is composed from reused segments carries a :class:`~tokendance_sgl.request_state.RowPlan`
(``req.td.row_plan``): its row ``[0, prefix_len)`` is "cached" as far as SGLang knows, but some of those rows still
have to be computed in this request's context -- the positions chosen for recompute (their slots are the request's
private diff slots) and uncached text between segments. :func:`build_prepass_batch` turns the pending rows of an
extend batch into ONE replay batch and :func:`forward_replay` runs it:

* each request with rows to compute becomes ONE sequence of the replay batch whose queries are those rows
  (scattered rows allowed), at their own positions (``req.td.positions``); its attention is
  ``kernels.selective_extend_attention`` over the request's row ``req_to_token[idx, :end]``, causal by row, so a
  recomputed token attends to every row before it -- master rows, private rows and the other recomputed tokens
  (within a layer every query's K/V is written before the attention runs);
* writes go only to ``req_to_token[idx, rows]``, which the plan guarantees are the request's own slots.

:func:`run_probe` computes a check layer's K/V of a row range into scratch slots (``deviation`` selection).
:func:`shift_positions` applies every request's position map to a forward batch (extend, decode, the replay).
The collector (:mod:`tokendance_sgl.collector`) decides what runs when.
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from tokendance_sgl.host import to_device
from tokendance_sgl.position_map import shift_batch
from tokendance_sgl.request_state import row_plan_of

__all__ = ["shift_positions", "pending_rows", "forward_limit", "split_rows", "Replay", "build_prepass_batch",
           "forward_replay", "run_probe"]


def shift_positions(positions: torch.Tensor, reqs, lengths: list[int]) -> None:
    """In place: ``positions`` holds ``lengths[i]`` consecutive entries per request ``reqs[i]`` (a position equals its
    row before shifting); each request's position map (``req.td.positions``) is applied to its entries, for the
    whole batch in one device operation (:func:`~tokendance_sgl.position_map.shift_batch`)."""
    shift_batch(positions, [st.positions if (st := getattr(req, "td", None)) is not None else None for req in reqs],
                lengths)


def forward_limit(runner) -> Optional[int]:
    """The most query tokens one replay or probe forward may hold: SGLang's ``--chunked-prefill-size`` (None: no
    limit)."""
    size = getattr(getattr(runner, "server_args", None), "chunked_prefill_size", None)
    return int(size) if size is not None and int(size) > 0 else None


def split_rows(rows: list[tuple[int, int, int]], limit: Optional[int]) -> list[list[tuple[int, int, int]]]:
    """``rows`` (``(i, start, end)``, each request's in row order) cut into forwards of at most ``limit`` query
    tokens; a span longer than what is left of a forward continues in the next one."""
    if limit is None:
        return [rows] if rows else []
    parts: list[list[tuple[int, int, int]]] = [[]]
    room = limit
    for i, s, e in rows:
        while s < e:
            if room == 0:
                parts.append([])
                room = limit
            m = min(e, s + room)
            parts[-1].append((i, s, m))
            room -= m - s
            s = m
    return [p for p in parts if p]


def pending_rows(batch) -> list[tuple[int, int, int]]:
    rows = []
    for i, req in enumerate(batch.reqs):
        plan = row_plan_of(req)
        if plan is None or not plan.pending or not plan.compute_spans:
            continue
        if plan.compute_spans[-1][1] > batch.prefix_lens[i]:
            raise RuntimeError(
                f"recompute span {plan.compute_spans[-1]} reaches past the cached prefix ({batch.prefix_lens[i]}) "
                f"of request {req.rid}"
            )
        rows.extend((i, s, e) for s, e in plan.compute_spans)
    return rows


@dataclass
class Replay:
    """A replay batch (:func:`build_prepass_batch`) and, per query token, its request (index into ``batch.reqs``) and
    its row."""

    batch: Any
    q_req: torch.Tensor
    q_rows: torch.Tensor


def build_prepass_batch(batch, runner, rows: list[tuple[int, int, int]]) -> Replay:
    """A copy of the extend ScheduleBatch with ONE sequence per request whose queries are the rows of its spans
    ``(i, start, end)`` (scattered rows allowed); logits are not used. Each query attends to its request's row up to
    itself (:func:`forward_replay` runs the attention as ``selective_extend_attention``)."""
    device = runner.device
    req_to_token = runner.req_to_token_pool.req_to_token
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, s, e in rows:
        spans.setdefault(i, []).append((s, e))
    idx = list(spans)
    reqs = [batch.reqs[i] for i in idx]
    q_rows = [np.concatenate([np.arange(s, e) for s, e in spans[i]]) for i in idx]
    lens = [len(r) for r in q_rows]
    ends = [max(e for _, e in spans[i]) for i in idx]
    pool_idx_cpu = batch.req_pool_indices_cpu[idx]

    pre = copy(batch)
    pre.reqs = reqs
    pre.input_ids = to_device(np.concatenate([
        np.asarray(r.full_untruncated_fill_ids[int(rr[0]) : int(rr[-1]) + 1], dtype=np.int64)[rr - rr[0]]
        for r, rr in zip(reqs, q_rows)]), device)  # (host-to-device copies from pinned memory: no stream wait)
    pre.prefill_input_ids_cpu = None
    pre.req_pool_indices = batch.req_pool_indices[idx]
    pre.req_pool_indices_cpu = pool_idx_cpu
    pre.prefix_lens = [e - n for e, n in zip(ends, lens)]  # consistent lengths; positions come from the rows
    pre.extend_lens = lens
    pre.extend_num_tokens = sum(lens)
    pre.seq_lens = to_device(np.asarray(ends, dtype=np.int64), device)
    pre.seq_lens_cpu = torch.tensor(ends, dtype=torch.int64)
    pre.seq_lens_sum = sum(ends)
    pre.orig_seq_lens = pre.seq_lens
    rows_t = [to_device(r, device) for r in q_rows]
    pre.out_cache_loc = torch.cat([req_to_token[int(pool_idx_cpu[k]), r] for k, r in enumerate(rows_t)]).to(torch.int64)
    pre.return_logprob = False
    pre.top_logprobs_nums = None
    pre.token_ids_logprobs = None
    pre.extend_logprob_start_lens = lens
    pre.extend_input_logprob_token_ids = None
    pre.is_prefill_only = True
    pre.spec_info = None
    pre.sampling_info = None
    pre.has_grammar = False
    pre.multimodal_inputs = [None] * len(reqs)
    pre.decoding_reqs = None
    if hasattr(pre, "engram_history"):
        pre.engram_history = None
    if getattr(batch, "global_num_tokens", None) is not None:
        pre.global_num_tokens = [pre.extend_num_tokens]
        pre.global_num_tokens_for_logprob = [len(lens)]
    q_req = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    return Replay(pre, to_device(q_req, device), torch.cat(rows_t).to(torch.int64))


@contextmanager
def _selective_attention(runner, replay: Replay):
    """For this forward only, ``runner.attn_backend.forward_extend`` (SGLang's ``AttentionBackend.forward_extend``, as an
    instance attribute) writes the K/V of the query rows, then attends each query over its request's rows up to its
    own with ``kernels.selective_extend_attention`` (Triton on GPU, torch on CPU)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from tokendance_sgl.kernels import plan_selective_extend_attention, selective_extend_attention

    backend = runner.attn_backend
    pool = runner.token_to_kv_pool
    rtt = runner.req_to_token_pool.req_to_token
    plan: list = []  # the query plan, built by the first layer and shared by every other

    def forward_extend(q, k, v, layer, forward_batch, save_kv_cache=True, **_kw):
        if save_kv_cache and k is not None:
            pool.set_kv_buffer(layer, KVWriteLoc.for_layer(forward_batch, layer), k, v)
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if not plan:
            plan.append(plan_selective_extend_attention(q, replay.q_req, replay.q_rows,
                                                        forward_batch.req_pool_indices.numel()))
        o = selective_extend_attention(
            q, pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id), rtt,
            forward_batch.req_pool_indices, forward_batch.seq_lens, replay.q_req, replay.q_rows,
            sm_scale=layer.scaling, logit_cap=float(getattr(layer, "logit_cap", 0) or 0), plan=plan[0])
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    backend.forward_extend = forward_extend
    try:
        yield
    finally:
        del backend.forward_extend


def forward_replay(runner, replay: Replay, *, selective: bool = True) -> None:
    """Runs the replay batch. ``selective=False``: each sequence must be one contiguous span ending at its
    ``seq_lens``, and runs as a plain extend through the configured attention backend."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch

    pre = replay.batch
    fb = ForwardBatch.init_new(
        pre, runner, capture_hidden_mode=CaptureHiddenMode.NULL, return_hidden_states_before_norm=False
    )
    positions = replay.q_rows.to(fb.positions.dtype).clone()
    shift_positions(positions, pre.reqs, list(pre.extend_lens))
    fb.positions = positions
    if not selective:
        runner.forward(fb)
        return
    with _selective_attention(runner, replay):
        runner.forward(fb)


class _ProbeDone(Exception):
    pass


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__} for a selection probe")
    return layers


@contextmanager
def _stop_after_layer(model, layer: int):
    """Stops a forward once decoder layer ``layer`` has run (its K/V are in the pool)."""
    layers = _decoder_layers(model)
    if layer + 1 >= len(layers):
        yield
        return

    def _stop(*_args, **_kwargs):
        raise _ProbeDone

    handle = layers[layer + 1].register_forward_pre_hook(_stop)
    try:
        yield
    except _ProbeDone:
        pass
    finally:
        handle.remove()


def run_probe(worker, batch, rows: list[tuple[int, int, int]], layer: int,
              alloc: Callable[[int], Optional[torch.Tensor]], pool: Any) -> Optional[list[tuple]]:
    """Computes the check layer's K/V of rows ``[s, e)`` of request ``batch.reqs[i]`` for every ``(i, s, e)`` of
    ``rows``, in its real context, in ONE forward through layers ``0..layer`` (attending to the request's row before
    ``s``; the rows themselves go to scratch slots from ``alloc``, whole pages of ``pool``, so the row's slots --
    shared masters included -- are untouched; ``pool`` frees them). Returns per row ``(k_new, v_new, k_old,
    v_old)`` (``[e - s, heads, head_dim]``; ``old`` = what the row holds now), or None when the pool has no room
    for the scratch slots."""
    runner = worker.model_runner
    rtt = runner.req_to_token_pool.req_to_token
    n = sum(e - s for _, s, e in rows)
    ps = getattr(pool, "page_size", 1)
    pages = alloc(-(-n // ps) * ps)
    if pages is None:
        return None
    pages = pages.to(torch.int64)
    scratch = pages[:n]
    saved = []
    try:
        off = 0
        for i, s, e in rows:
            idx = int(batch.req_pool_indices_cpu[i])
            saved.append((idx, s, e, rtt[idx, s:e].clone()))
            rtt[idx, s:e] = scratch[off : off + e - s].to(rtt.dtype)
            off += e - s
        for part in split_rows(rows, forward_limit(runner)):  # the scratch rows stay mapped across the parts
            with _stop_after_layer(runner.model, layer):
                forward_replay(runner, build_prepass_batch(batch, runner, part))
        kv = pool.get_kvcache()
        kb, vb = kv.get_key_buffer(layer), kv.get_value_buffer(layer)
        old = torch.cat([kept for *_, kept in saved]).to(torch.int64)
        sizes = [e - s for _, s, e in rows]
        parts = [torch.split(x, sizes) for x in (kb[scratch], vb[scratch], kb[old], vb[old])]
        return list(zip(*parts))
    finally:
        for idx, s, e, kept in saved:
            rtt[idx, s:e] = kept
        pool.free(pages)
