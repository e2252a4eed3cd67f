"""The KV collector: segment reuse planned once per round for all the agents that wait together.

Two moments of a scheduling step (both driven from hooks in ``patches/``):

* :meth:`KVCollector.collect` -- the scheduler is about to admit waiting requests (``SchedulePolicy.calc_priority``).
  The requests are grouped by round (same ``td_round`` and namespace, or else the same segments). For each group the
  canonical bases are chosen from the agents present (:meth:`KVCollector.plan_bases`), and every master copy the
  group needs at those bases is made in ONE batched copy + re-rotation call (:meth:`CollectiveTree.master_copies`).
  Each request's row is then composed from those copies when SGLang admits it (``init_load_back``).
* :meth:`KVCollector.select` -- right before the extend forward of the admitted batch. For ``deviation`` policies,
  each segment's recompute positions are chosen ONCE per round: one pilot agent (the row of the batch with the
  smallest position gap, whatever the arrival order) gets the check-layer K/V of the segment in its own context from
  one probe forward (all segments and pilots of the batch together), compared with the shared master; the top tokens
  become the recompute positions of every agent reading that master. The rows then get private diff slots there,
  and the batched pre-pass recomputes every agent's chosen positions in one forward.

Late arrivals (a later scheduling step of the same round) find the round's bases, copies and choices and reuse them.
``pic`` (:mod:`tokendance_sgl.pic`) skips the collective step: every request is its own pilot.

Canonical bases. In a round the shared region of every agent's row starts at position ``B`` (the base); an agent
whose region starts at ``s0 <= B`` runs its rows ``>= s0`` shifted by ``B - s0`` (a hole in the position ids). A gap
is allowed up to ``max_gap``. :meth:`plan_bases` covers the region starts of the agents present with as few bases as
possible: the smallest uncovered start ``s`` opens the base ``align_up(max{s_j : align_up(s_j) <= s + max_gap})``,
which covers every start in ``[s, B]``. So an agent whose private part is longer than the base (its region starts
after ``B``) gets a base of its own, and its own master copies.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING, Any, Hashable, Iterable

import numpy as np

from tokendance_sgl.diff_alloc import coalesce
from tokendance_sgl.selection import deviation_scores

if TYPE_CHECKING:
    from tokendance_sgl.collective_tree import CollectiveTree

__all__ = ["KVCollector", "align_up"]

_MAX_KEYS = 256  # rounds remembered (bases and choices)


def align_up(x: int, align: int) -> int:
    align = max(1, int(align))
    return -(-int(x) // align) * align


class KVCollector:
    def __init__(self, tree: "CollectiveTree"):
        self.tree = tree
        self.bases: OrderedDict = OrderedDict()  # round key -> canonical bases in use
        self.choices: OrderedDict = OrderedDict()  # selection key -> chosen offsets (np.int64)

    def reset(self) -> None:
        self.bases.clear()
        self.choices.clear()

    @staticmethod
    def _remember(store: OrderedDict, key: Hashable, value) -> Any:
        got = store.setdefault(key, value)
        store.move_to_end(key)
        while len(store) > _MAX_KEYS:
            store.popitem(last=False)
        return got

    # ------------------------------------------------------------------ bases

    def plan_bases(self, key: Hashable, starts: Iterable[int]) -> list[int]:
        """Opens the bases needed to cover ``starts`` (region starts of the agents present) for round ``key``, with
        as few new bases as possible; returns the round's bases."""
        cfg = self.tree.config
        starts = [int(x) for x in starts]
        bases = self._remember(self.bases, key, [])
        for s in sorted(set(starts)):
            if any(s <= b <= s + cfg.max_gap for b in bases):
                continue
            limit = s + cfg.max_gap
            reach = [x for x in starts if s <= x and align_up(x, cfg.base_align) <= limit]
            bases.append(align_up(max(reach), cfg.base_align) if reach else s)  # unaligned if no aligned one fits
        return bases

    def base_for(self, key: Hashable, s0: int) -> int:
        """The base a region starting at ``s0`` uses: the smallest base of the round that covers it (opened now if
        none does)."""
        bases = self.plan_bases(key, [s0])
        return min(b for b in bases if s0 <= b <= s0 + self.tree.config.max_gap)

    # ------------------------------------------------------------------ the collective step

    def collect(self, waiting: Iterable[Any]) -> int:
        """Plans the waiting requests of each round together: bases from the agents present, then every missing
        master copy of every round in one batched re-rotation. Returns the number of copies made."""
        from tokendance_sgl.reuse import plan_layout

        tree = self.tree
        if tree.disable or not tree.config.reuse:
            return 0
        groups: dict = defaultdict(list)
        for req in waiting:
            if getattr(getattr(req, "kv", None), "holds_kv", False) or getattr(req, "finished_reason", None):
                continue
            tree.plan_for(req)
            lay = plan_layout(tree, req, 0, len(req.origin_input_ids))
            if lay is not None and lay.policy.reuses_masters:
                groups[lay.base_key].append(lay)
        if not groups:
            return 0
        wants = []
        for key, lays in groups.items():
            self.plan_bases(key, [lay.region_start for lay in lays])
            for lay in lays:
                gap = self.base_for(key, lay.region_start) - lay.region_start
                wants.extend((tree.segment(ps.key), a + gap) for a, _, ps in lay.spans)
        before = tree.counters["master_copies"]
        pinned: list = []
        try:
            tree.master_copies(wants, pinned)
        finally:
            for seg in pinned:
                tree.unlock_segment(seg)
        made = tree.counters["master_copies"] - before
        tree.counters["collect_steps"] += 1
        tree.counters["collect_copy_calls"] += int(made > 0)
        return made

    # ------------------------------------------------------------------ selection (worker side)

    def select(self, worker: Any, batch: Any) -> dict[int, tuple[int, int]]:
        """Resolves the pending ``deviation`` selections of ``batch`` (see the module docstring). Returns, per batch
        index that served as a pilot, the probe's tokens and tokens x layers."""
        from tokendance_sgl.recompute import plan_of, run_probe

        tree = self.tree
        todo = []
        for i, req in enumerate(batch.reqs):
            plan = plan_of(req)
            if plan is not None and plan.pending and plan.select:
                todo.extend((i, req, plan, it) for it in plan.select)
        if not todo:
            return {}
        chosen: dict[int, np.ndarray] = {}
        # The pilot of a shared choice does not depend on arrival order: the agent of the batch whose row sits
        # closest to the canonical positions (smallest gap), then the shortest prompt, then its first tokens.
        pilot_of: dict = {}
        for i, req, plan, it in todo:
            if it.sel_key is not None and it.sel_key not in self.choices:
                rank = (plan.gap, len(req.origin_input_ids), tuple(req.origin_input_ids[:64]), i)
                if it.sel_key not in pilot_of or rank < pilot_of[it.sel_key][0]:
                    pilot_of[it.sel_key] = (rank, i)
        pilots: dict = defaultdict(list)  # (layer, batch index) -> items measured in that request's context
        for i, _req, _plan, it in todo:
            if it.sel_key is not None:
                got = self.choices.get(it.sel_key)
                if got is not None:
                    chosen[id(it)] = got
                    tree.counters["selections_shared"] += 1
                    continue
                if pilot_of[it.sel_key][1] != i:
                    continue  # another agent of this batch is the pilot
            pilots[(it.policy.layer, i)].append(it)
        probe_tokens: dict[int, tuple[int, int]] = {}
        by_layer: dict = defaultdict(list)
        for (layer, i), items in pilots.items():
            plan = plan_of(batch.reqs[i])
            by_layer[layer].append((i, plan.probe_start, max(it.start + it.n for it in items)))
        for layer, rows in by_layer.items():
            measured = run_probe(worker, batch, rows, layer, tree)
            if measured is None:
                continue  # no room for the probe: these segments keep their static (sink) positions
            for (i, s, e), (k_new, v_new, k_old, v_old) in zip(rows, measured):
                for it in pilots[(layer, i)]:
                    a = it.start - s
                    scores = deviation_scores(k_new[a : a + it.n], v_new[a : a + it.n], k_old[a : a + it.n],
                                              v_old[a : a + it.n])
                    off = it.policy.choose(it.n, scores)
                    chosen[id(it)] = off
                    if it.sel_key is not None:
                        self._remember(self.choices, it.sel_key, off)
                    tree.counters["selections"] += 1
                tok, tl = probe_tokens.get(i, (0, 0))
                probe_tokens[i] = (tok + e - s, tl + (e - s) * (layer + 1))
                tree.counters["probe_tokens"] += e - s
                tree.counters["probe_token_layers"] += (e - s) * (layer + 1)
        for i, req, plan, it in todo:
            off = chosen.get(id(it))
            if off is None and it.sel_key is not None:
                off = self.choices.get(it.sel_key)  # the pilot of this batch measured it
                tree.counters["selections_shared"] += int(off is not None)
            extra = np.setdiff1d(off, it.static) if off is not None else np.empty(0, np.int64)
            positions = it.start + extra
            if positions.size and not plan.private_copies and not tree.privatize(req, positions):
                positions = positions[:0]  # no room: read the master there
            if positions.size:
                plan.compute_spans = coalesce(plan.compute_spans + [(int(p), int(p) + 1) for p in positions])
                tree.counters["recomputed_tokens"] += int(positions.size)
                tree.counters["reused_tokens"] -= int(positions.size)
        for _i, _req, plan, _it in todo:
            plan.select = []
        return probe_tokens
