"""Selective recompute inside a request's row, and the position shift of aligned rows.

A request whose row is built from reused segments gets a :class:`RowPlan` (``req.td_row_plan``) from the cache when it
is admitted.  Its row ``[0, prefix_len)`` is then "cached" as far as SGLang knows, but some of those rows still
have to be computed in this request's context: the positions chosen for recompute (their slots are the request's
private diff slots) and uncached text between or around segments.  :func:`run_prepass` computes all of them, for
every request of an extend batch, in ONE extra forward before the normal extend:

* each request with rows to compute becomes ONE sequence of a replay batch whose queries are those rows (scattered
  rows allowed), at their own (shifted) positions; its attention is ``selective_extend_attention`` over the
  request's row ``req_to_token[idx, :end]``, causal by row, so a recomputed token attends to every row before it --
  master rows, private rows and the other recomputed tokens (within a layer every query's K/V is written before the
  attention runs);
* writes go only to ``req_to_token[idx, start:end]``, which the plan guarantees are the request's own slots.

Aligned layout: rows ``>= gap_start`` run at position ``row + gap`` (the shared region of a round gets the same
canonical position ids in every agent's row, and the rest continues from the canonical end).
:func:`shift_positions` applies that to any forward batch (extend, decode and the replay batch itself).
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import numpy as np
import torch


@dataclass(eq=False)
class SelectItem:
    """A reused segment run (rows ``[start, start + n)``) whose recompute positions depend on measured deviation."""

    start: int
    n: int
    policy: Any  # tokendance_sgl.selection.RecomputePolicy
    sel_key: Optional[Hashable]  # shared choice of the round (tokendance); None: chosen for this request (pic)
    static: np.ndarray  # offsets already recomputed (the sink part)


@dataclass
class RowPlan:
    compute_spans: list[tuple[int, int]] = field(default_factory=list)
    gap_start: int = 0
    gap: int = 0
    exact_len: Optional[int] = None  # rows [0, exact_len) hold exact KV (None: the whole row); the radix takes no more
    pending: bool = True  # compute_spans not run yet
    select: list = field(default_factory=list)  # SelectItems still to resolve before the pre-pass
    probe_start: int = 0  # first row a selection probe computes (the end of the radix prefix)
    private_copies: bool = False  # every composed row is private (pic): a selection needs no new slots

    def __post_init__(self) -> None:
        prev = -1
        for s, e in self.compute_spans:
            if not (0 <= s < e) or s < prev:
                raise ValueError(f"compute spans must be sorted, disjoint and non-empty: {self.compute_spans}")
            prev = e
        if self.gap < 0 or self.gap_start < 0:
            raise ValueError("gap and gap_start must be >= 0")

    @property
    def compute_tokens(self) -> int:
        return sum(e - s for s, e in self.compute_spans)

    def position_of(self, row: int) -> int:
        return row + self.gap if self.gap and row >= self.gap_start else row


def plan_of(req) -> RowPlan | None:
    return getattr(req, "td_row_plan", None)


def shift_positions(positions: torch.Tensor, reqs, lengths: list[int]) -> None:
    """In place: ``positions`` holds ``lengths[i]`` consecutive entries per request ``reqs[i]``; add each shifted
    request's gap to its entries at rows >= gap_start (a position equals its row before shifting)."""
    off = 0
    for req, n in zip(reqs, lengths):
        plan = plan_of(req)
        if plan is not None and plan.gap and n:
            seg = positions[off : off + n]
            seg += (seg >= plan.gap_start).to(seg.dtype) * plan.gap
        off += n


def _pending_rows(batch) -> list[tuple[int, int, int]]:
    rows = []
    for i, req in enumerate(batch.reqs):
        plan = plan_of(req)
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
    itself (:func:`_forward` runs the attention as ``selective_extend_attention``)."""
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
    pre.input_ids = torch.tensor(
        [r.full_untruncated_fill_ids[int(t)] for r, rr in zip(reqs, q_rows) for t in rr], dtype=torch.int64,
        device=device)
    pre.prefill_input_ids_cpu = None
    pre.req_pool_indices = batch.req_pool_indices[idx]
    pre.req_pool_indices_cpu = pool_idx_cpu
    pre.prefix_lens = [e - n for e, n in zip(ends, lens)]  # consistent lengths; positions come from the rows
    pre.extend_lens = lens
    pre.extend_num_tokens = sum(lens)
    pre.seq_lens = torch.tensor(ends, dtype=torch.int64, device=device)
    pre.seq_lens_cpu = torch.tensor(ends, dtype=torch.int64)
    pre.seq_lens_sum = sum(ends)
    pre.orig_seq_lens = pre.seq_lens
    rows_t = [torch.from_numpy(r).to(device) for r in q_rows]
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
    q_req = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(lens)])
    return Replay(pre, q_req.to(device), torch.cat(rows_t).to(torch.int64))


@contextmanager
def _selective_attention(runner, replay: Replay):
    """For this forward only, ``runner.attn_backend.forward_extend`` (SGLang's ``AttentionBackend.forward_extend``, as an
    instance attribute) writes the K/V of the query rows, then attends each query over its request's rows up to its
    own with ``kernels.selective_extend_attention`` (Triton on GPU, torch on CPU)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from tokendance_sgl.kernels import selective_extend_attention

    backend = runner.attn_backend
    pool = runner.token_to_kv_pool
    rtt = runner.req_to_token_pool.req_to_token

    def forward_extend(q, k, v, layer, forward_batch, save_kv_cache=True, **_kw):
        if save_kv_cache and k is not None:
            pool.set_kv_buffer(layer, KVWriteLoc.for_layer(forward_batch, layer), k, v)
        o = selective_extend_attention(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id), rtt, forward_batch.req_pool_indices, forward_batch.seq_lens,
            replay.q_req, replay.q_rows, sm_scale=layer.scaling, logit_cap=float(getattr(layer, "logit_cap", 0) or 0))
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    backend.forward_extend = forward_extend
    try:
        yield
    finally:
        del backend.forward_extend


def _forward(runner, replay: Replay) -> None:
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch

    pre = replay.batch
    fb = ForwardBatch.init_new(
        pre, runner, capture_hidden_mode=CaptureHiddenMode.NULL, return_hidden_states_before_norm=False
    )
    positions = replay.q_rows.to(fb.positions.dtype).clone()
    shift_positions(positions, pre.reqs, list(pre.extend_lens))
    fb.positions = positions
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


def run_probe(worker, batch, rows: list[tuple[int, int, int]], layer: int, tree) -> Optional[list[tuple]]:
    """Computes the check layer's K/V of rows ``[s, e)`` of request ``batch.reqs[i]`` for every ``(i, s, e)`` of
    ``rows``, in its real context, in ONE forward through layers ``0..layer`` (attending to the request's row before
    ``s``; the rows themselves go to scratch slots, so the row's slots -- shared masters included -- are untouched).
    Returns per row ``(k_new, v_new, k_old, v_old)`` (``[e - s, heads, head_dim]``; ``old`` = what the row holds
    now), or None when the pool has no room for the scratch slots."""
    runner = worker.model_runner
    rtt = runner.req_to_token_pool.req_to_token
    n = sum(e - s for _, s, e in rows)
    scratch = tree._alloc_slots(n)
    if scratch is None:
        return None
    scratch = scratch.to(torch.int64)
    saved = []
    try:
        off = 0
        for i, s, e in rows:
            idx = int(batch.req_pool_indices_cpu[i])
            saved.append((idx, s, e, rtt[idx, s:e].clone()))
            rtt[idx, s:e] = scratch[off : off + e - s].to(rtt.dtype)
            off += e - s
        with _stop_after_layer(runner.model, layer):
            _forward(runner, build_prepass_batch(batch, runner, rows))
        kv = tree.token_to_kv_pool_allocator.get_kvcache()
        kb, vb = kv.get_key_buffer(layer), kv.get_value_buffer(layer)
        old = torch.cat([sl for *_, sl in saved]).to(torch.int64)
        sizes = [e - s for _, s, e in rows]
        parts = [torch.split(x, sizes) for x in (kb[scratch], vb[scratch], kb[old], vb[old])]
        return list(zip(*parts))
    finally:
        for idx, s, e, sl in saved:
            rtt[idx, s:e] = sl
        tree.token_to_kv_pool_allocator.free(scratch)


def run_prepass(worker, batch) -> int:
    """Resolves pending selections (:meth:`tokendance_sgl.collector.KVCollector.select`), then computes every pending
    span of the batch's requests in one forward, and accounts the round's prefill work. Returns the pre-pass tokens."""
    if batch is None or not batch.forward_mode.is_extend() or not batch.reqs:
        return 0
    tree = getattr(batch, "tree_cache", None)
    collector = getattr(tree, "collector", None)
    if collector is None:
        return 0
    probe = collector.select(worker, batch)
    rows = _pending_rows(batch)
    prepass: dict[int, int] = {}
    if rows:
        runner = worker.model_runner
        replay = build_prepass_batch(batch, runner, rows)
        _forward(runner, replay)
        for i, s, e in rows:
            prepass[i] = prepass.get(i, 0) + e - s
        for req in replay.batch.reqs:
            plan = req.td_row_plan
            plan.pending = False
            if not req.retracted_stain:
                # SGLang counted the whole composed region as cached; the recomputed rows were not.
                req.cached_tokens -= plan.compute_tokens
    for i, req in enumerate(batch.reqs):
        plan = getattr(req, "td_plan", None)
        tokens, token_layers = probe.get(i, (0, 0))
        tree.note_prefill(plan.round if plan is not None else None, extend=int(batch.extend_lens[i]),
                          prepass=prepass.get(i, 0), probe=tokens, probe_token_layers=token_layers)
    return sum(prepass.values())
