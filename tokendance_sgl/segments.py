"""Segment tables and segment detection for TokenDance (pure Python: no torch, no sglang).

A *segment* is a block of tokens that several prompts share at arbitrary positions, typically one agent's output of
the previous round gathered into every agent's next prompt. A request names the segments inside its prompt with a
**segment table** carried in ``sampling_params.custom_params`` (SGLang only allows scalars and flat lists of scalars
there):

==================  ==============  ===========================================================================
key                 type            meaning
==================  ==============  ===========================================================================
``td_round``        int >= 0        round of this request (optional)
``td_agent``        int >= 0        agent id of this request (optional)
``td_seg_ids``      list[str]       ids of the shared segments inside the prompt, e.g. ``"r1/a3"``
``td_seg_starts``   list[int]       token offsets into the request's ``input_ids``: segment i is
``td_seg_ends``     list[int]       ``input_ids[starts[i]:ends[i]]``; the three lists have the same length
``td_out_seg``      str             id under which this request's generated output is registered (optional)
``td_ns``           str             namespace mixed into the content hash (optional, default ``""``)
``td_recompute``    str             recompute policy for this request (optional; see tokendance_sgl.selection)
==================  ==============  ===========================================================================

Rules checked by :func:`parse_segment_table` (each violation raises :class:`SegmentTableError` naming the key):
the three span lists come together or not at all and have equal lengths; ids are non-empty strings; offsets are
ints (``bool`` and ``float`` are refused); ``0 <= start < end <= len(input_ids)``; spans are sorted by start and do
not overlap (touching is fine); ``td_round``/``td_agent`` are ints >= 0; ``td_out_seg`` is a non-empty string;
``td_ns`` is a string; any other key starting with ``td_`` is refused (a typo would otherwise be ignored silently).
A request whose ``custom_params`` holds no ``td_`` key has no table (``None``).

Which ids are *known* and whether a span's tokens match the registered content is decided by the cache
(:class:`tokendance_sgl.collective_tree.CollectiveTree`), which has the registry; the rule is documented there.

For prompts without a table, :class:`SegmentDetector` finds registered segments by a polynomial rolling hash over
windows of ``min_len`` tokens (default 16): every registered segment is indexed by the hash of its first window; a
prompt position whose window hash hits the index is verified token by token and extended greedily as far as the
prompt and the segment agree. Matches are chosen left to right, longest first at a position, never overlapping, and
scanning resumes after each match, so repeated occurrences are all found. Only occurrences that start at a
segment's first token are found (a suffix of a segment is not); a prefix of a segment of at least ``min_len``
tokens is found.

Content identity: :func:`content_hash` is BLAKE2b-128 over the namespace (UTF-8) and the token ids as little-endian
int64, so equal token ids under equal namespaces give equal keys in every process.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import struct
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Iterator, Mapping, Optional, Sequence

__all__ = [
    "TD_KEYS",
    "SegmentTableError",
    "SegmentSpan",
    "SegmentTable",
    "parse_segment_table",
    "content_hash",
    "Detection",
    "SegmentDetector",
    "window_hashes",
    "DEFAULT_MIN_SEGMENT_LEN",
]

TD_KEYS = ("td_round", "td_agent", "td_seg_ids", "td_seg_starts", "td_seg_ends", "td_out_seg", "td_ns", "td_recompute")
_SPAN_KEYS = ("td_seg_ids", "td_seg_starts", "td_seg_ends")
DEFAULT_MIN_SEGMENT_LEN = 16


class SegmentTableError(ValueError):
    """A malformed segment table (or one that names a segment the cache cannot accept). The message is meant for
    the client (HTTP 400)."""


@dataclass(slots=True)
class SegmentSpan:  # a parsed table's span, made when asked for (a table keeps its spans as three tuples)
    seg_id: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SegmentTable:
    round: Optional[int] = None
    agent: Optional[int] = None
    # the spans as three parallel tuples (one object per table, not one per span: a table is parsed per request)
    seg_ids: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    out_seg: Optional[str] = None
    ns: str = ""
    # True when td_seg_ids/starts/ends were given (possibly empty lists); detection then stays off.
    has_spans: bool = False

    def __len__(self) -> int:
        return len(self.seg_ids)

    def __iter__(self) -> Iterator[SegmentSpan]:
        return map(SegmentSpan, self.seg_ids, self.starts, self.ends)

    @property
    def spans(self) -> tuple[SegmentSpan, ...]:
        return tuple(self)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return type(x).__name__


def _get_nonneg_int(params: Mapping[str, Any], key: str) -> Optional[int]:
    if key not in params or params[key] is None:
        return None
    v = params[key]
    if not _is_int(v):
        raise SegmentTableError(f"{key} must be an int >= 0, got {_type_name(v)} {v!r}")
    if v < 0:
        raise SegmentTableError(f"{key} must be an int >= 0, got {v}")
    return int(v)


def _get_list(params: Mapping[str, Any], key: str) -> tuple:
    v = params.get(key)
    if not isinstance(v, (list, tuple)):
        raise SegmentTableError(f"{key} must be a list, got {_type_name(v)}")
    return tuple(v)


def _well_formed(ids: tuple, starts: tuple, ends: tuple, prompt_len: Optional[int]) -> bool:
    """Whether the span lists break none of the rules of :func:`parse_segment_table` (exact ``int`` offsets)."""
    if not ids:
        return True
    return (set(map(type, starts)) == _INT and set(map(type, ends)) == _INT and set(map(type, ids)) == _STR
            and all(map(str.strip, ids))
            and starts[0] >= 0 and all(map(operator.lt, starts, ends))  # each span non-empty
            and all(map(operator.le, ends, starts[1:]))  # sorted, disjoint
            and (prompt_len is None or ends[-1] <= prompt_len))


_INT, _STR = {int}, {str}


def parse_segment_table(custom_params: Optional[Mapping[str, Any]], prompt_len: Optional[int]) -> Optional[SegmentTable]:
    """Parses and validates the TokenDance segment table in ``custom_params``.

    Returns None when ``custom_params`` carries no ``td_*`` key. ``prompt_len`` is ``len(input_ids)``; pass None when
    it is not known yet (the upper bound of the spans is then not checked). Raises :class:`SegmentTableError` with a
    message naming the offending key and index.
    """
    if custom_params is None:
        return None
    if not isinstance(custom_params, Mapping):
        raise SegmentTableError(f"custom_params must be a dict, got {_type_name(custom_params)}")
    present = [k for k in custom_params if isinstance(k, str) and k.startswith("td_")]
    if not present:
        return None
    unknown = sorted(k for k in present if k not in TD_KEYS)
    if unknown:
        raise SegmentTableError(f"unknown TokenDance key(s) {unknown}; valid keys are {list(TD_KEYS)}")

    rnd = _get_nonneg_int(custom_params, "td_round")
    agent = _get_nonneg_int(custom_params, "td_agent")

    out_seg = custom_params.get("td_out_seg")
    if out_seg is not None and (not isinstance(out_seg, str) or not out_seg.strip()):
        raise SegmentTableError(f"td_out_seg must be a non-empty string, got {_type_name(out_seg)} {out_seg!r}")

    ns = custom_params.get("td_ns")
    if ns is None:
        ns = ""
    elif not isinstance(ns, str):
        raise SegmentTableError(f"td_ns must be a string, got {_type_name(ns)}")

    given = [k for k in _SPAN_KEYS if k in custom_params and custom_params[k] is not None]
    spans: list[SegmentSpan] = []
    has_spans = bool(given)
    if given:
        if len(given) != len(_SPAN_KEYS):
            missing = [k for k in _SPAN_KEYS if k not in given]
            raise SegmentTableError(f"td_seg_ids, td_seg_starts and td_seg_ends go together; missing {missing}")
        ids = _get_list(custom_params, "td_seg_ids")
        starts = _get_list(custom_params, "td_seg_starts")
        ends = _get_list(custom_params, "td_seg_ends")
        if not (len(ids) == len(starts) == len(ends)):
            raise SegmentTableError(
                f"td_seg_ids, td_seg_starts and td_seg_ends must have the same length, got "
                f"{len(ids)}, {len(starts)}, {len(ends)}"
            )
        if _well_formed(ids, starts, ends, prompt_len):  # the common case, checked in bulk
            return SegmentTable(round=rnd, agent=agent, seg_ids=ids, starts=starts, ends=ends,
                                out_seg=out_seg, ns=ns, has_spans=True)
        prev_end = 0  # which rule is broken, and where
        for i, (sid, s, e) in enumerate(zip(ids, starts, ends)):
            if not isinstance(sid, str) or not sid.strip():
                raise SegmentTableError(f"td_seg_ids[{i}] must be a non-empty string, got {_type_name(sid)} {sid!r}")
            if not _is_int(s):
                raise SegmentTableError(f"td_seg_starts[{i}] must be an int, got {_type_name(s)} {s!r}")
            if not _is_int(e):
                raise SegmentTableError(f"td_seg_ends[{i}] must be an int, got {_type_name(e)} {e!r}")
            if s < 0:
                raise SegmentTableError(f"segment {i} ({sid!r}): start {s} is negative")
            if e <= s:
                raise SegmentTableError(f"segment {i} ({sid!r}): end {e} must be greater than start {s}")
            if prompt_len is not None and e > prompt_len:
                raise SegmentTableError(
                    f"segment {i} ({sid!r}): span [{s}, {e}) lies outside the prompt of {prompt_len} tokens"
                )
            if i > 0 and s < prev_end:
                raise SegmentTableError(
                    f"segment {i} ({sid!r}): span [{s}, {e}) is unsorted or overlaps the previous span ending at "
                    f"{prev_end}; spans must be sorted by start and must not overlap"
                )
            prev_end = e
            spans.append(SegmentSpan(sid, int(s), int(e)))
    return SegmentTable(round=rnd, agent=agent, seg_ids=tuple(sp.seg_id for sp in spans),
                        starts=tuple(sp.start for sp in spans), ends=tuple(sp.end for sp in spans), out_seg=out_seg,
                        ns=ns, has_spans=has_spans)


# ----------------------------------------------------------------------------------------------------------------
# Content hash
# ----------------------------------------------------------------------------------------------------------------


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        import array

        if isinstance(tokens, array.array) and tokens.typecode == "q":
            a = tokens
        else:
            a = array.array("q", tokens)
        if struct.pack("=q", 1) != struct.pack("<q", 1):  # big-endian host
            a = array.array("q", a)
            a.byteswap()
        return a.tobytes()
    except (OverflowError, TypeError):
        return b"".join(struct.pack("<q", int(t)) for t in tokens)


def content_hash(tokens: Sequence[int], ns: str = "") -> str:
    """Stable content key of a token sequence under a namespace (hex BLAKE2b-128)."""
    h = hashlib.blake2b(digest_size=16)
    nsb = ns.encode("utf-8")
    h.update(struct.pack("<Q", len(nsb)))
    h.update(nsb)
    h.update(_token_bytes(tokens))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Rolling-hash detection
# ----------------------------------------------------------------------------------------------------------------

_BASE = 0x9E3779B97F4A7C15  # odd 64-bit multiplier; arithmetic is mod 2**64 (numpy uint64 wraps)


@functools.lru_cache(maxsize=8)
def _window_powers(window: int):
    """``B**(window-1-m)`` for ``m < window`` (read-only; one table per window length)."""
    import numpy as np

    pw = np.empty(window, dtype=np.uint64)
    pw[0] = 1
    pw[1:] = np.uint64(_BASE)
    pw = np.cumprod(pw, dtype=np.uint64)[::-1].copy()
    pw.flags.writeable = False
    return pw


def window_hashes(tokens: Sequence[int], window: int):
    """Polynomial hash ``sum_m t[i+m] * B**(window-1-m) mod 2**64`` of every window ``tokens[i:i+window]``
    (numpy uint64 array of length ``len(tokens) - window + 1``; empty if the sequence is shorter)."""
    import numpy as np

    t = np.asarray(tokens, dtype=np.int64).astype(np.uint64)
    n = len(t)
    if window <= 0:
        raise ValueError("window must be positive")
    if n < window:
        return np.empty(0, dtype=np.uint64)
    pw = _window_powers(window)
    with np.errstate(over="ignore"):
        if n == window:  # one window (a segment's first, when it is indexed)
            return (t * pw).sum(dtype=np.uint64).reshape(1)
        return (np.lib.stride_tricks.sliding_window_view(t, window) * pw).sum(axis=1, dtype=np.uint64)


@dataclass(frozen=True)
class Detection:
    start: int
    end: int
    key: Hashable

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class _Entry:
    key: Hashable
    tokens: Any  # numpy int64 array once hashed (until then the caller's sequence: the store passes its own copy)
    ns: Hashable
    order: int


@dataclass
class SegmentDetector:
    """Index of registered segments for rolling-hash detection inside plain prompts.

    ``add(key, tokens, ns)`` indexes a segment (segments shorter than ``min_len`` are ignored and ``add`` returns
    False); ``remove(key)`` drops it; ``find(prompt, ns)`` returns the non-overlapping occurrences, left to right.
    Only segments registered under the same ``ns`` are matched. A segment added is hashed when the next ``find``
    needs it (a server whose requests all carry segment tables never hashes one).
    """

    min_len: int = DEFAULT_MIN_SEGMENT_LEN
    _by_hash: dict = field(default_factory=dict)  # window hash (int) -> list[_Entry]
    _by_key: dict = field(default_factory=dict)  # key -> (_Entry, hash)
    _counter: int = 0
    _hash_array: Any = None  # cached sorted numpy array of the indexed hashes
    _unhashed: dict = field(default_factory=dict)  # key -> _Entry added since the last find (not in _by_hash yet)

    def __post_init__(self):
        if not _is_int(self.min_len) or self.min_len < 1:
            raise ValueError(f"min_len must be a positive int, got {self.min_len!r}")

    def __len__(self) -> int:
        return len(self._by_key) + len(self._unhashed)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key or key in self._unhashed

    def add(self, key: Hashable, tokens: Sequence[int], ns: Hashable = "") -> bool:
        if len(tokens) < self.min_len:
            return False
        self.remove(key)
        self._counter += 1
        self._unhashed[key] = _Entry(key, tokens, ns, self._counter)
        return True

    def _hash_added(self) -> None:
        import numpy as np

        for key, entry in self._unhashed.items():
            entry.tokens = np.asarray(entry.tokens, dtype=np.int64).copy()
            h = int(window_hashes(entry.tokens[: self.min_len], self.min_len)[0])
            self._by_hash.setdefault(h, []).append(entry)
            self._by_key[key] = (entry, h)
        self._unhashed.clear()
        self._hash_array = None

    def remove(self, key: Hashable) -> bool:
        if self._unhashed.pop(key, None) is not None:
            return True
        item = self._by_key.pop(key, None)
        if item is None:
            return False
        entry, h = item
        lst = self._by_hash.get(h, [])
        lst[:] = [e for e in lst if e.key != key]
        if not lst:
            self._by_hash.pop(h, None)
        self._hash_array = None
        return True

    def clear(self) -> None:
        self._by_hash.clear()
        self._by_key.clear()
        self._unhashed.clear()
        self._hash_array = None

    def keys(self) -> Iterable[Hashable]:
        return [*self._by_key, *self._unhashed]

    def find(self, prompt: Sequence[int], ns: Hashable = "", *, start: int = 0, end: Optional[int] = None) -> list[Detection]:
        """Occurrences of indexed segments in ``prompt[start:end]`` (positions are absolute)."""
        import numpy as np

        if self._unhashed:
            self._hash_added()
        if not self._by_key:
            return []
        p = np.asarray(prompt, dtype=np.int64)
        end = len(p) if end is None else min(end, len(p))
        L = self.min_len
        if end - start < L:
            return []
        if self._hash_array is None:
            self._hash_array = np.array(sorted(self._by_hash.keys()), dtype=np.uint64)
        hashes = window_hashes(p[start:end], L)
        cand = np.nonzero(np.isin(hashes, self._hash_array))[0]
        out: list[Detection] = []
        cursor = start
        for off in cand.tolist():
            pos = start + off
            if pos < cursor:
                continue
            best: Optional[tuple[int, int, _Entry]] = None
            for e in self._by_hash.get(int(hashes[off]), ()):
                if e.ns != ns:
                    continue
                m = _common_prefix_len(p, pos, end, e.tokens)
                if m < L:
                    continue  # hash collision or mismatch inside the first window
                if best is None or m > best[0] or (m == best[0] and e.order < best[1]):
                    best = (m, e.order, e)
            if best is not None:
                m, _, e = best
                out.append(Detection(pos, pos + m, e.key))
                cursor = pos + m
        return out


def _common_prefix_len(p, pos: int, end: int, seg) -> int:
    import numpy as np

    n = min(end - pos, len(seg))
    if n <= 0:
        return 0
    eq = p[pos : pos + n] == seg[:n]
    if eq.all():
        return n
    return int(np.argmin(eq))
