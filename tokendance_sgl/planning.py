"""Which registered segments a prompt contains: its segment table checked against the store, or detection.

Known ids: a table naming an id the store has never seen registered or announced (``td_out_seg`` of an earlier
request) is refused ("unknown segment id"). A span naming a known id must hold a prefix of the registered tokens
(clients may drop trailing tokens, e.g. EOS): when the segment node is alive its tokens are compared; when it was
evicted and the span has the registered length, the content hash is compared. A provable mismatch is never reused:
by default the span is recomputed with a warning (status ``"mismatch"``); with ``strict_content``
(``TOKENDANCE_STRICT_SEGMENTS=1``) the request is refused ("segment does not match the prompt"). A known id whose
segment was evicted, is still pending, or lives in another namespace is not an error: the span is recomputed
(``kv_len == 0``).

A malformed table never raises inside the scheduler: the plan carries the error and the request proceeds without
segments; :func:`validate_request` gives the same error to the request-receipt hook, which fails the request with
HTTP 400. Requests without ``td_seg_*`` spans get their segments by rolling-hash detection when it is on.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from typing import Any, Optional

from tokendance_sgl.request_state import PlannedSegment, SegmentPlan, state_of
from tokendance_sgl.segment_store import SegmentStore
from tokendance_sgl.segments import SegmentTableError, content_hash, parse_segment_table

logger = logging.getLogger(__name__)

__all__ = ["plan_for", "validate_request", "ns_key_of"]


def ns_key_of(req: Any, td_ns: str = "") -> str:
    """Namespace of a request's segments: ``td_ns`` alone (so a client can compute ``content_hash(tokens, td_ns)``
    itself), extended with the request's ``extra_key`` (LoRA) and ``cache_salt`` when it has them (they change
    the KV)."""
    extra, salt = getattr(req, "extra_key", None), getattr(req, "cache_salt", None)
    if extra is None and salt is None:
        return td_ns or ""
    return json.dumps([td_ns or "", extra, salt], default=str)


def _is_prefix(part: array, whole: array) -> bool:
    n = len(part)
    return 0 < n <= len(whole) and (part == whole if n == len(whole) else part == whole[:n])


def _warn_once(req: Any, msg: str) -> None:
    st = state_of(req)
    if st.warned != msg:
        st.warned = msg
        logger.warning("request %s: segment table: %s", getattr(req, "rid", "?"), msg)


def _table_spans(store: SegmentStore, table, prompt, ns_key: str, rnd: Optional[int], strict: bool, req: Any):
    """The planned spans of a segment table, or an error that refuses the request."""
    spans: list[PlannedSegment] = []
    now = time.monotonic()
    if not isinstance(prompt, array):
        prompt = array("q", prompt)  # once: its spans are then compared without a conversion each
    ids, get, has_kv = store.ids, store.get, store.has_kv
    for i, (seg_id, start, end) in enumerate(zip(table.seg_ids, table.starts, table.ends)):
        toks = prompt[start:end]
        rec = ids.get(seg_id)
        if rec is None:
            if seg_id in store.pending_ids:
                spans.append(PlannedSegment(start, end, seg_id, None, "table", "pending", 0))
                continue
            return [], (f"segment {i}: unknown segment id {seg_id!r} (no request registered it or announced it "
                        f"as td_out_seg)")
        node = get(rec.key)
        if node is not None:
            ok = _is_prefix(toks, node.tokens)
        elif len(toks) == rec.length:
            ok = content_hash(toks, rec.ns_key) == rec.key
        else:
            ok = len(toks) <= rec.length  # evicted and not verifiable: recomputed anyway
        if not ok:
            msg = (f"segment {i} ({seg_id!r}): the prompt tokens [{start}, {end}) do not match the "
                   f"registered segment (segment does not match the prompt)")
            if strict:
                return [], msg
            _warn_once(req, msg + "; the span is recomputed")
            spans.append(PlannedSegment(start, end, seg_id, rec.key, "table", "mismatch", 0))
            continue
        if node is None or not has_kv(node):
            status, kv_len, anchor, resident = "evicted", 0, None, None
        elif node.ns_key != ns_key:
            status, kv_len, anchor, resident = "other-namespace", 0, None, None
        else:
            kv_len, n = node.kv_len, end - start
            status, kv_len, anchor, resident = "resident", kv_len if kv_len < n else n, node.anchor, node
        if node is not None:
            if rnd is not None and rnd > node.used_round:
                node.used_round = rnd
            node.last_access_time = now
        spans.append(PlannedSegment(start, end, seg_id, rec.key, "table", status, kv_len, anchor, resident))
    return spans, None


def _detected_spans(store: SegmentStore, prompt, ns_key: str, rnd: Optional[int]) -> list[PlannedSegment]:
    spans = []
    now = time.monotonic()
    for d in store.detector.find(prompt, ns_key):
        node = store.get(d.key)
        if node is None:
            continue
        valid = store.has_kv(node)
        seg_id = min(node.ids) if node.ids else None
        spans.append(PlannedSegment(d.start, d.end, seg_id, node.key, "detected", "resident" if valid else "evicted",
                                    min(node.kv_len, len(d)) if valid else 0, node.anchor if valid else None,
                                    node if valid else None))
        if rnd is not None and rnd > node.used_round:
            node.used_round = rnd
        node.last_access_time = now
    return spans


def table_of(req: Any) -> Any:
    """``req``'s segment table (None: it has none), parsed once per request; raises :class:`SegmentTableError`."""
    st = state_of(req)
    n = len(req.origin_input_ids)
    if st.table is None or st.table[0] != n:
        try:
            st.table = (n, parse_segment_table(getattr(req.sampling_params, "custom_params", None), n), None)
        except SegmentTableError as e:
            st.table = (n, None, e)
    if st.table[2] is not None:
        raise st.table[2]
    return st.table[1]


def plan_for(store: SegmentStore, config: Any, req: Any, *, force: bool = False) -> SegmentPlan:
    """Which registered segments ``req``'s prompt contains (``req.td.plan``); cheap when nothing changed."""
    st = state_of(req)
    prompt = req.origin_input_ids
    plan = st.plan
    if not force and plan is not None and plan.epoch == store.epoch and plan.prompt_len == len(prompt):
        return plan
    try:
        table = table_of(req)
    except SegmentTableError as e:
        st.plan = SegmentPlan(None, None, None, ns_key_of(req), "none", [], str(e), store.epoch, len(prompt))
        _warn_once(req, st.plan.error + "; serving the request without segments")
        return st.plan
    rnd = table.round if table is not None else None
    store.note_round(rnd)
    if table is not None and table.out_seg:
        store.announce(table.out_seg, rnd)
    ns_key = ns_key_of(req, table.ns if table is not None else "")
    spans, error, source = [], None, "none"
    if table is not None and table.has_spans:
        source = "table"
        spans, error = _table_spans(store, table, prompt, ns_key, rnd, config.strict_content, req)
        if error is not None:
            _warn_once(req, error + "; serving the request without segments")
    elif config.detect and len(store.detector):
        spans = _detected_spans(store, prompt, ns_key, rnd)
        source = "detected" if spans else "none"
    st.plan = SegmentPlan(round=rnd, agent=table.agent if table is not None else None,
                          out_seg=table.out_seg if table is not None else None, ns_key=ns_key, source=source,
                          spans=spans, error=error, epoch=store.epoch, prompt_len=len(prompt))
    st.agent = st.plan.agent
    return st.plan


def validate_request(store: Optional[SegmentStore], config: Any, req: Any) -> Optional[str]:
    """The error that should fail ``req`` with HTTP 400 (malformed table, unknown segment id, content mismatch),
    or None. ``store`` None: the cache is disabled, only the table's shape is checked."""
    if store is None:
        try:
            parse_segment_table(getattr(req.sampling_params, "custom_params", None), len(req.origin_input_ids))
        except SegmentTableError as e:
            return str(e)
        return None
    return plan_for(store, config, req, force=True).error
