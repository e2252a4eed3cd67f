"""Segment tables (parsing/validation), the content hash and rolling-hash detection (pure Python, no sglang)."""

from __future__ import annotations

import random
import subprocess
import sys
from array import array

import pytest

import tokendance_sgl  # noqa: F401
from tokendance_sgl.segments import (
    Detection,
    SegmentDetector,
    SegmentTable,
    SegmentTableError,
    content_hash,
    parse_segment_table,
    window_hashes,
)


def table(**kw):
    base = {"td_round": 1, "td_agent": 2, "td_seg_ids": ["r0/a0", "r0/a1"], "td_seg_starts": [3, 10],
            "td_seg_ends": [10, 14], "td_out_seg": "r1/a2"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


# ------------------------------------------------------------------------------------------------ parse


def test_no_table():
    assert parse_segment_table(None, 10) is None
    assert parse_segment_table({}, 10) is None
    assert parse_segment_table({"other": 1, "reasoning_end_token_ids": [1, 2]}, 10) is None


def test_valid_table():
    t = parse_segment_table(table(), 20)
    assert isinstance(t, SegmentTable)
    assert (t.round, t.agent, t.out_seg, t.ns) == (1, 2, "r1/a2", "")
    assert [(s.seg_id, s.start, s.end) for s in t] == [("r0/a0", 3, 10), ("r0/a1", 10, 14)]
    assert t.seg_ids == ("r0/a0", "r0/a1") and len(t) == 2 and t.has_spans
    assert len(t.spans[0]) == 7


def test_table_without_spans_and_tuples_and_bounds():
    t = parse_segment_table({"td_round": 0, "td_out_seg": "x"}, 5)
    assert t.spans == () and not t.has_spans and t.out_seg == "x"
    t = parse_segment_table({"td_seg_ids": [], "td_seg_starts": [], "td_seg_ends": []}, 5)
    assert t.has_spans and len(t) == 0 and t.round is None
    # touching spans, span ending at the prompt end, tuples, unknown prompt length
    t = parse_segment_table({"td_seg_ids": ("a", "b"), "td_seg_starts": (0, 4), "td_seg_ends": (4, 9)}, 9)
    assert [(s.start, s.end) for s in t] == [(0, 4), (4, 9)]
    t = parse_segment_table({"td_seg_ids": ["a"], "td_seg_starts": [0], "td_seg_ends": [10**6]}, None)
    assert t.spans[0].end == 10**6
    assert parse_segment_table({"td_ns": "ns1", "td_round": None}, 3).ns == "ns1"
    # the same segment may occur twice
    t = parse_segment_table({"td_seg_ids": ["a", "a"], "td_seg_starts": [0, 5], "td_seg_ends": [3, 8]}, 9)
    assert t.seg_ids == ("a", "a")


BAD = [
    ("notadict", None, "custom_params must be a dict"),
    (table(td_round=-1), 20, "td_round"),
    (table(td_round=1.0), 20, "td_round must be an int"),
    (table(td_round=True), 20, "td_round must be an int"),
    (table(td_agent="3"), 20, "td_agent"),
    (table(td_seg_ends=...), 20, "go together"),
    (table(td_seg_ids="r0/a0"), 20, "td_seg_ids must be a list"),
    (table(td_seg_starts=[3]), 20, "same length"),
    (table(td_seg_ids=["r0/a0", 7]), 20, "td_seg_ids[1] must be a non-empty string"),
    (table(td_seg_ids=["r0/a0", " "]), 20, "non-empty string"),
    (table(td_seg_starts=[3, "10"]), 20, "td_seg_starts[1] must be an int"),
    (table(td_seg_starts=[3, 10.0]), 20, "must be an int"),
    (table(td_seg_ends=[10, None]), 20, "td_seg_ends[1] must be an int"),
    (table(td_seg_ends=[10, False]), 20, "must be an int"),
    (table(td_seg_starts=[-1, 10]), 20, "negative"),
    (table(td_seg_ends=[3, 14]), 20, "must be greater than start"),
    (table(td_seg_ends=[10, 9]), 20, "must be greater than start"),
    (table(td_seg_starts=[10, 3], td_seg_ends=[14, 10]), 20, "unsorted or overlaps"),
    (table(td_seg_starts=[3, 9]), 20, "unsorted or overlaps"),
    (table(td_seg_ends=[10, 21]), 20, "outside the prompt"),
    (table(td_out_seg=""), 20, "td_out_seg must be a non-empty string"),
    (table(td_out_seg=5), 20, "td_out_seg"),
    (table(td_ns=3), 20, "td_ns must be a string"),
    ({"td_segids": ["a"]}, 20, "unknown TokenDance key"),
]


@pytest.mark.parametrize("params,plen,msg", BAD)
def test_bad_tables(params, plen, msg):
    with pytest.raises(SegmentTableError) as ei:
        parse_segment_table(params, plen)
    assert msg in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_parser_imports_without_sglang_or_torch():
    code = (
        "import sys; import tokendance_sgl.segments as s; "
        "s.parse_segment_table({'td_round': 1}, 3); "
        "bad = [m for m in ('sglang', 'torch') if m in sys.modules]; print(bad); assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


# ------------------------------------------------------------------------------------------------ hash


def test_content_hash():
    a = content_hash([1, 2, 3])
    assert a == content_hash(array("q", [1, 2, 3])) == content_hash((1, 2, 3))
    assert len(a) == 32 and int(a, 16) >= 0
    assert a != content_hash([1, 2, 3], "ns")
    assert a != content_hash([1, 2, 3, 0])
    assert a != content_hash([3, 2, 1])
    assert content_hash([1, 2, 3], "ns") == content_hash([1, 2, 3], "ns")
    # namespace and tokens cannot be confused by concatenation
    assert content_hash([], "\x01") != content_hash([1], "")
    # stable across processes (no PYTHONHASHSEED dependence)
    code = "from tokendance_sgl.segments import content_hash; print(content_hash([5, 6, 7], 'x'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert out == content_hash([5, 6, 7], "x")


def test_window_hashes_match_reference():
    B, M = 0x9E3779B97F4A7C15, 2**64
    rng = random.Random(0)
    for n, L in [(50, 16), (16, 16), (40, 1), (33, 7)]:
        t = [rng.randrange(0, 200_000) for _ in range(n)]
        ref = [sum(t[i + m] * pow(B, L - 1 - m, M) for m in range(L)) % M for i in range(n - L + 1)]
        assert [int(x) for x in window_hashes(t, L)] == ref
    assert len(window_hashes([1, 2, 3], 4)) == 0


# ------------------------------------------------------------------------------------------------ detection


def seq(rng, n, lo=1000, hi=50_000):
    return [rng.randrange(lo, hi) for _ in range(n)]


def test_detector_basic_repeated_and_adjacent():
    rng = random.Random(1)
    A, B = seq(rng, 20), seq(rng, 30)
    d = SegmentDetector(min_len=16)
    assert d.add("A", A) and d.add("B", B) and len(d) == 2
    p = seq(rng, 5) + A + B + seq(rng, 3) + A + seq(rng, 2)
    found = d.find(p)
    assert found == [Detection(5, 25, "A"), Detection(25, 55, "B"), Detection(58, 78, "A")]
    assert [p[x.start : x.end] for x in found] == [A, B, A]


def test_detector_prefix_occurrence_and_min_len():
    rng = random.Random(2)
    A = seq(rng, 40)
    d = SegmentDetector(min_len=16)
    d.add("A", A)
    # the client stripped the last tokens: a prefix of >= min_len is found, extended greedily
    p = seq(rng, 4) + A[:25] + seq(rng, 4)
    assert d.find(p) == [Detection(4, 29, "A")]
    # shorter than min_len: not found
    assert d.find(seq(rng, 4) + A[:15] + seq(rng, 4)) == []
    # suffixes are not found (only occurrences starting at the segment's first token)
    assert d.find(A[5:]) == []
    # segments shorter than min_len are not indexed
    assert not d.add("short", A[:10]) and "short" not in d


def test_detector_overlap_prefers_leftmost_then_longest():
    rng = random.Random(3)
    common = seq(rng, 16)
    A = common + seq(rng, 4)  # 20
    B = common + seq(rng, 10)  # 26, same first window as A
    d = SegmentDetector(min_len=16)
    d.add("A", A)
    d.add("B", B)
    assert d.find(B) == [Detection(0, 26, "B")]  # longest at the same position
    assert d.find(A) == [Detection(0, 20, "A")]
    # overlapping occurrences: C starts inside an occurrence of A; leftmost wins, scan resumes after it
    C = A[10:] + seq(rng, 10)
    d.add("C", C)
    p = A + C[10:]  # C occurs at 10 (overlapping A), A at 0
    got = d.find(p)
    assert got[0] == Detection(0, 20, "A")
    assert all(x.start >= 20 for x in got[1:])
    # non-overlapping, sorted output
    for x, y in zip(got, got[1:]):
        assert x.end <= y.start


def test_detector_namespaces_remove_and_ranges():
    rng = random.Random(4)
    A = seq(rng, 18)
    d = SegmentDetector(min_len=16)
    d.add("A", A, ns="x")
    assert d.find(A, ns="y") == []
    assert d.find(A, ns="x") == [Detection(0, 18, "A")]
    p = seq(rng, 10) + A
    assert d.find(p, ns="x", start=10) == [Detection(10, 28, "A")]
    assert d.find(p, ns="x", end=20) == []
    assert d.remove("A") and not d.remove("A") and len(d) == 0 and d.find(A, ns="x") == []
    d.add("A", A)
    d.clear()
    assert len(d) == 0
    with pytest.raises(ValueError):
        SegmentDetector(min_len=0)


def test_detector_hash_collision_is_verified(monkeypatch):
    import numpy as np

    import tokendance_sgl.segments as segs

    # force every window to the same hash: detection must still compare tokens exactly
    monkeypatch.setattr(segs, "window_hashes", lambda t, w: np.zeros(max(0, len(t) - w + 1), dtype=np.uint64))
    d = SegmentDetector(min_len=4)
    d.add("A", [1, 2, 3, 4, 5])
    assert d.find([9, 9, 9, 9, 9, 1, 2, 3, 4, 5, 9]) == [Detection(5, 10, "A")]
    assert d.find([1, 2, 3, 9, 5]) == []


def test_detector_random_against_bruteforce():
    rng = random.Random(5)
    L = 6
    segs_ = {f"s{i}": [rng.randrange(1, 8) for _ in range(rng.randrange(L, 14))] for i in range(6)}
    d = SegmentDetector(min_len=L)
    order = {}
    for k, v in segs_.items():
        d.add(k, v)
        order[k] = len(order)
    for _ in range(200):
        parts = []
        for _ in range(rng.randrange(1, 6)):
            if rng.random() < 0.5:
                k = rng.choice(list(segs_))
                v = segs_[k]
                parts += v[: rng.randrange(L - 1, len(v) + 1)]
            else:
                parts += [rng.randrange(1, 8) for _ in range(rng.randrange(0, 5))]
        got = d.find(parts)
        # brute force: leftmost, then longest, then first registered
        exp, i = [], 0
        while i < len(parts):
            best = None
            for k, v in segs_.items():
                m = 0
                while m < len(v) and i + m < len(parts) and parts[i + m] == v[m]:
                    m += 1
                if m >= L and (best is None or m > best[0] or (m == best[0] and order[k] < order[best[1]])):
                    best = (m, k)
            if best:
                exp.append(Detection(i, i + best[0], best[1]))
                i += best[0]
            else:
                i += 1
        assert got == exp, (parts, got, exp)
