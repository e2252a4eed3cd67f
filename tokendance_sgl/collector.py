"""The KV collector: segment reuse planned once per round for all the agents that wait together.

Three moments of a scheduling step (each driven from a hook in ``patches/``):

* :meth:`KVCollector.collect` -- the scheduler is about to admit waiting requests (``SchedulePolicy.calc_priority``).
  The requests are grouped by round (same ``td_round`` and namespace, or else the same segments). For each group the
  canonical bases are chosen from the agents present (:mod:`tokendance_sgl.bases`), and every master copy the group
  needs at those bases is made in ONE batched copy + re-rotation call
  (:meth:`~tokendance_sgl.segment_store.SegmentStore.master_copies`). Each request's row is then composed from those
  copies when SGLang admits it (``init_load_back``).
* :meth:`KVCollector.select` -- right before the extend forward of the admitted batch. For ``deviation`` policies,
  each segment's recompute positions are chosen ONCE per round: one pilot agent (the row of the batch with the
  smallest position shift, whatever the arrival order) gets the check-layer K/V of the segment in its own context
  from one probe forward (all segments and pilots of the batch together), compared with the shared master; the top
  tokens become the recompute positions of every agent reading that master. The rows then get private diff slots
  there.
* :meth:`KVCollector.run_prepass` -- the batched pre-pass. First the text before each row's first reused segment
  (at the cached prefix's own positions) as a plain extend through the configured attention backend; then the
  selection above; then every agent's chosen positions and the text between segments in ONE replay forward
  (:mod:`tokendance_sgl.recompute`); then the round's prefill work is accounted. Every forward holds at most
  ``--chunked-prefill-size`` query tokens.

Late arrivals (a later scheduling step of the same round) find the round's bases, copies and choices and reuse them.
``pic`` (:mod:`tokendance_sgl.pic`) skips the collective step: every request is its own pilot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch

from tokendance_sgl.accounting import TreeStats
from tokendance_sgl.bases import remember
from tokendance_sgl.diff_alloc import coalesce
from tokendance_sgl.faults import Faults
from tokendance_sgl.recompute import (build_prepass_batch, forward_limit, forward_replay, pending_rows, run_probe,
                                      split_rows)
from tokendance_sgl.request_state import RowLayout, row_plan_of, state_of
from tokendance_sgl.reuse import ReuseHost, gap_budget, release_tails
from tokendance_sgl.selection import deviation_scores

__all__ = ["KVCollector", "CollectorHost"]

logger = logging.getLogger(__name__)


class CollectorHost(ReuseHost, Protocol):
    """What the collector needs on top of :class:`~tokendance_sgl.reuse.ReuseHost`."""

    disable: bool
    stats: TreeStats
    faults: Faults
    token_to_kv_pool_allocator: Any

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]: ...

    def privatize(self, req: Any, positions: np.ndarray) -> Optional[np.ndarray]: ...

    def early_layout(self, req: Any) -> Optional[RowLayout]: ...

    def plan_for(self, req: Any) -> Any: ...

    def recompute_region(self, req: Any) -> Optional[tuple[int, int]]: ...


class KVCollector:
    collective = True  # pic: False (no shared bases, copies or choices)

    def __init__(self, host: CollectorHost):
        self.host = host
        self.choices: OrderedDict = OrderedDict()  # selection key -> chosen offsets (np.int64)

    def reset(self) -> None:
        self.choices.clear()

    # ------------------------------------------------------------------ the collective step

    def collect(self, waiting: Iterable[Any]) -> int:
        """Plans the waiting requests of each round together: bases from the agents present, then every missing
        master copy of every round in one batched re-rotation. A request is planned by the first step that sees it
        waiting (a later step plans only the new arrivals). Returns the number of copies made."""
        host = self.host
        if not self.collective or host.disable or not host.config.reuse:
            return 0
        groups: dict = defaultdict(list)
        for req in waiting:
            if getattr(getattr(req, "kv", None), "holds_kv", False) or getattr(req, "finished_reason", None):
                continue
            st = state_of(req)
            if st.collected:  # planned by an earlier step; its copies are made on demand if they went meanwhile
                continue
            st.collected = True
            host.plan_for(req)
            layout = host.early_layout(req)
            if layout is not None and layout.policy.reuses_masters:
                groups[layout.base_key].append((layout, gap_budget(host, req, layout.prefix_positions)))
        if not groups:
            return 0
        wants: dict = {}  # (segment, anchor, page offset) -> want: the agents at one base want the same copies
        ps, get = host.page_size, host.store.get
        for key, lays in groups.items():
            host.bases.plan(key, [layout.prefix_positions.position_of(layout.region_start) for layout, _ in lays])
            for layout, budget in lays:
                p0 = layout.prefix_positions.position_of(layout.region_start)
                shift = host.bases.base_for(key, p0, budget) - p0 + layout.prefix_positions.total
                for a, _, planned in layout.spans:
                    want = (planned.key, a + shift, a % ps)
                    if want not in wants:
                        wants[want] = (get(planned.key), a + shift, a)
        before = host.store.counters["master_copies"]
        host.store.master_copies(list(wants.values()), None)
        made = host.store.counters["master_copies"] - before
        host.stats.counters["collect_steps"] += 1
        host.stats.counters["collect_copy_calls"] += int(made > 0)
        return made

    # ------------------------------------------------------------------ selection (worker side)

    def _pilots(self, todo: list) -> tuple[dict, dict]:
        """The items measured this batch, by (check layer, batch index), and the choices taken from the round."""
        counters = self.host.stats.counters
        # The pilot of a shared choice does not depend on arrival order: the agent of the batch whose row sits
        # closest to the canonical positions (smallest shift), then the shortest prompt, then its first tokens.
        pilot_of: dict = {}
        for i, req, _plan, it in todo:
            if it.sel_key is not None and it.sel_key not in self.choices:
                rank = (state_of(req).positions.total, len(req.origin_input_ids), tuple(req.origin_input_ids[:64]), i)
                if it.sel_key not in pilot_of or rank < pilot_of[it.sel_key][0]:
                    pilot_of[it.sel_key] = (rank, i)
        chosen: dict[int, np.ndarray] = {}
        pilots: dict = defaultdict(list)  # (layer, batch index) -> items measured in that request's context
        for i, _req, _plan, it in todo:
            if it.sel_key is not None:
                got = self.choices.get(it.sel_key)
                if got is not None:
                    chosen[id(it)] = got
                    counters["selections_shared"] += 1
                    continue
                if pilot_of[it.sel_key][1] != i:
                    continue  # another agent of this batch is the pilot
            pilots[(it.policy.layer, i)].append(it)
        return pilots, chosen

    def _measure(self, worker: Any, batch: Any, pilots: dict, chosen: dict) -> dict[int, tuple[int, int]]:
        """One probe forward per check layer for every pilot; fills ``chosen``; returns the probe work per index."""
        host = self.host
        counters = host.stats.counters
        probe_tokens: dict[int, tuple[int, int]] = {}
        pages = host.page_size > 1 and host.config.page_select
        by_layer: dict = defaultdict(list)
        for (layer, i), items in pilots.items():
            plan = row_plan_of(batch.reqs[i])
            by_layer[layer].append((i, plan.probe_start, max(it.start + it.n for it in items)))
        for layer, rows in by_layer.items():
            measured = run_probe(worker, batch, rows, layer, host.alloc_slots, host.token_to_kv_pool_allocator)
            if measured is None:  # no room for the probe: these segments keep their static (sink) positions
                counters["probe_no_room"] += sum(len(pilots[(layer, i)]) for i, _s, _e in rows)
                logger.warning("tokendance: no KV room for a selection probe of %d rows; their segments keep their "
                               "static positions", len(rows))
                continue
            for (i, s, e), (k_new, v_new, k_old, v_old) in zip(rows, measured):
                for it in pilots[(layer, i)]:
                    a = it.start - s
                    scores = deviation_scores(k_new[a : a + it.n], v_new[a : a + it.n], k_old[a : a + it.n],
                                              v_old[a : a + it.n])
                    off = it.policy.choose(it.n, scores, pages=(it.start, host.page_size) if pages else None)
                    chosen[id(it)] = off
                    if it.sel_key is not None:
                        remember(self.choices, it.sel_key, off)
                    counters["selections"] += 1
                tok, tl = probe_tokens.get(i, (0, 0))
                probe_tokens[i] = (tok + e - s, tl + (e - s) * (layer + 1))
                counters["probe_tokens"] += e - s
                counters["probe_token_layers"] += (e - s) * (layer + 1)
        return probe_tokens

    def select(self, worker: Any, batch: Any) -> dict[int, tuple[int, int]]:
        """Resolves the pending ``deviation`` selections of ``batch`` (see the module docstring). Returns, per batch
        index that served as a pilot, the probe's tokens and tokens x layers."""
        host = self.host
        counters = host.stats.counters
        todo = []
        for i, req in enumerate(batch.reqs):
            plan = row_plan_of(req)
            if plan is not None and plan.pending and plan.select:
                todo.extend((i, req, plan, it) for it in plan.select)
        if not todo:
            return {}
        pilots, chosen = self._pilots(todo)
        probe_tokens = self._measure(worker, batch, pilots, chosen)
        for _i, req, plan, it in todo:
            off = chosen.get(id(it))
            if off is None and it.sel_key is not None:
                off = self.choices.get(it.sel_key)  # the pilot of this batch measured it
                counters["selections_shared"] += int(off is not None)
            extra = np.setdiff1d(off, it.static) if off is not None else np.empty(0, np.int64)
            positions = it.start + extra
            private = positions
            if positions.size and not plan.private_copies:
                private = host.privatize(req, positions)
                if private is None:
                    positions = private = positions[:0]  # no room: read the master there
            if private.size and plan.tails:  # a privatized last token is this row's own: another row computes it
                mine = [t for t in plan.tails if t[1] in set(private.tolist())]
                release_tails(mine)
                plan.tails = [t for t in plan.tails if t not in mine]
            if positions.size:
                plan.compute_spans = coalesce(plan.compute_spans + [(int(p), int(p) + 1) for p in positions])
                counters["recomputed_tokens"] += int(positions.size)
                counters["reused_tokens"] -= int(positions.size)
        for _i, _req, plan, _it in todo:
            plan.select = []
        return probe_tokens

    # ------------------------------------------------------------------ the batched pre-pass

    def run_prepass(self, worker: Any, batch: Any) -> int:
        """Resolves pending selections, computes every pending span of the batch's requests in one forward, and
        accounts the round's prefill work. When that fails, every composed region of the batch is computed in full
        instead (:meth:`_fall_back`). Returns the pre-pass tokens."""
        runner = worker.model_runner
        try:
            lead = self._lead(runner, batch)
            probe = self.select(worker, batch)
            rows = pending_rows(batch)
            if rows:
                self.host.faults.check("prepass", self.host.store.current_round)
                self._forward(runner, batch, rows, selective=True)
            rows = lead + rows
        except Exception:
            logger.exception("tokendance: the pre-pass failed; computing the composed regions of the batch in full")
            probe, rows = {}, self._fall_back(runner, batch)
        prepass: dict[int, int] = {}
        for i, s, e in rows:
            prepass[i] = prepass.get(i, 0) + e - s
        for i in prepass:
            req = batch.reqs[i]
            plan = row_plan_of(req)
            plan.pending = False
            for seg, _row in plan.tails:  # the copies' last tokens are computed now, for every row reading them
                seg.tail_pending, seg.tail_writer = False, None
            self.host.stats.counters["tails_computed"] += len(plan.tails)
            if not req.retracted_stain:
                # SGLang counted the whole composed region as cached; the recomputed rows were not.
                req.cached_tokens -= plan.compute_tokens
        for i, req in enumerate(batch.reqs):
            plan = state_of(req).plan
            tokens, token_layers = probe.get(i, (0, 0))
            self.host.stats.note_prefill(plan.round if plan is not None else None, extend=int(batch.extend_lens[i]),
                                         prepass=prepass.get(i, 0), probe=tokens, probe_token_layers=token_layers)
        return sum(prepass.values())

    def _lead(self, runner: Any, batch: Any) -> list[tuple[int, int, int]]:
        """Computes the leading rows of every pending row plan (``RowPlan.lead_end``) as a plain extend over its
        cached prefix; returns them."""
        rows = []
        for i, req in enumerate(batch.reqs):
            plan = row_plan_of(req)
            if plan is not None and plan.pending and (span := plan.take_lead()) is not None:
                rows.append((i, *span))
        if rows:
            self._forward(runner, batch, rows, selective=False)
            self.host.stats.counters["prepass_lead_tokens"] += sum(e - s for _, s, e in rows)
        return rows

    def _forward(self, runner: Any, batch: Any, rows: list, *, selective: bool) -> None:
        """The replay forwards of ``rows``: at most ``--chunked-prefill-size`` query tokens each."""
        counters = self.host.stats.counters
        for part in split_rows(rows, forward_limit(runner)):
            forward_replay(runner, build_prepass_batch(batch, runner, part), selective=selective)
            counters["prepass_forwards"] += 1
            counters["prepass_largest_forward"] = max(counters["prepass_largest_forward"],
                                                      sum(e - s for _, s, e in part))

    def _fall_back(self, runner: Any, batch: Any) -> list[tuple[int, int, int]]:
        """Computes the whole composed region of every pending row of ``batch`` exactly, through the configured
        attention backend (each region is a plain extend over its cached prefix; forwards capped as in
        :meth:`_forward`). A request whose region cannot get private slots, or whose forward fails again, is aborted
        with an error; its row is then inserted under a namespace nothing matches. Returns the rows computed."""
        rows: list[tuple[int, int, int]] = []
        for i, req in enumerate(batch.reqs):
            plan = row_plan_of(req)
            if plan is None or not plan.pending:
                continue
            try:
                span = self.host.recompute_region(req)
            except Exception:
                logger.exception("tokendance: request %s: its composed region cannot be made its own", req.rid)
                span = None
            if span is None:
                self._abort(req, "no KV slots to recompute its reused segments after a failed pre-pass")
            else:
                rows.append((i, *span))
        try:
            if rows:
                self._forward(runner, batch, rows, selective=False)
        except Exception:
            logger.exception("tokendance: computing the composed regions in full failed too")
            for i, _s, _e in rows:
                self._abort(batch.reqs[i], "its reused segments could not be computed (pre-pass failed twice)")
            return []
        return rows

    def _abort(self, req: Any, why: str) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        plan = row_plan_of(req)
        release_tails(plan.tails)
        plan.tails, plan.select, plan.pending = [], [], False
        state_of(req).namespace = f"td:failed:{req.rid}"  # garbage KV: inserted where no request looks
        req.to_finish = FINISH_ABORT(f"tokendance: request {req.rid}: {why}")
        self.host.stats.counters["prepass_aborts"] += 1


def run_prepass(worker: Any, batch: Any, collector_of: Callable[[Any], Optional[KVCollector]]) -> int:
    """The pre-pass of an extend ``batch`` whose cache has a collector (0 for any other batch)."""
    if batch is None or not batch.forward_mode.is_extend() or not batch.reqs:
        return 0
    collector = collector_of(getattr(batch, "tree_cache", None))
    return 0 if collector is None else collector.run_prepass(worker, batch)
