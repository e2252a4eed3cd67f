"""Settings of the collective tree (``--kv-backend tokendance`` / ``pic``), read once when the cache is built.

Every field has an environment variable (``TOKENDANCE_*``) and may be overridden by the server's ``_tokendance``
bookkeeping dict (the ``--td-*`` flags). Bad values fail at start-up with a message naming the setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from tokendance_sgl.faults import ENV_FAULTS, Faults
from tokendance_sgl.segments import DEFAULT_MIN_SEGMENT_LEN
from tokendance_sgl.selection import DEFAULT_POLICY, parse_policy

__all__ = ["TreeConfig"]


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.strip().lower() not in ("0", "false", "no", "off")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return int(v)


@dataclass
class TreeConfig:
    """Settings of the collective tree (environment: ``TOKENDANCE_MIN_SEGMENT_LEN``, ``TOKENDANCE_AUTO_REGISTER``,
    ``TOKENDANCE_DETECT``, ``TOKENDANCE_MAX_WEAK_SEGMENTS``, ``TOKENDANCE_STRICT_SEGMENTS``, ``TOKENDANCE_REUSE``,
    ``TOKENDANCE_RECOMPUTE``, ``TOKENDANCE_BASE_ALIGN``, ``TOKENDANCE_MAX_GAP``, ``TOKENDANCE_MAX_DRIFT``,
    ``TOKENDANCE_TEST_FAULTS``, ``TOKENDANCE_PAGE_SELECT``)."""

    min_segment_len: int = DEFAULT_MIN_SEGMENT_LEN  # shortest segment detection can find
    auto_register: bool = True  # register outputs of plain finished requests as weak segments
    detect: bool = True  # rolling-hash detection for prompts without td_seg_* spans
    max_weak_segments: int = 4096  # weak segments hold no KV; this caps their token copies
    strict_content: bool = False  # a span whose tokens differ from its registered segment fails the request
    reuse: bool = True  # compose rows from masters (False: segments are tracked but every prompt is computed)
    recompute: str = DEFAULT_POLICY  # recompute policy (tokendance_sgl.selection)
    # a round's canonical base is rounded up to a multiple of this: > 1 leaves room for late arrivals with slightly
    # longer private parts, at the price of a hole of up to base_align - 1 positions for every agent (measured:
    # 16 cost teacher-forced top-1 0.905 -> 0.897 and KL 0.0117 -> 0.0134 on sink:4), so 1 by default
    base_align: int = 1
    max_gap: int = 64  # the largest position gap an agent accepts before it opens a base of its own
    # the largest total shift (sum of the gaps of every composed region in one agent's history) a row may carry;
    # a region that would pass it runs at its own base with no gap. Rows never pass the model's context length.
    max_drift: int = 512
    test_faults: str = ""  # steps made to fail, for tests (tokendance_sgl.faults)
    # page_size > 1: deviation picks its budget page by page (fewer pages copied on write), not token by token
    page_select: bool = True

    @classmethod
    def from_env(cls, overrides: Optional[dict] = None) -> "TreeConfig":
        cfg = cls(
            min_segment_len=_env_int("TOKENDANCE_MIN_SEGMENT_LEN", DEFAULT_MIN_SEGMENT_LEN),
            auto_register=_env_bool("TOKENDANCE_AUTO_REGISTER", True),
            detect=_env_bool("TOKENDANCE_DETECT", True),
            max_weak_segments=_env_int("TOKENDANCE_MAX_WEAK_SEGMENTS", 4096),
            strict_content=_env_bool("TOKENDANCE_STRICT_SEGMENTS", False),
            reuse=_env_bool("TOKENDANCE_REUSE", True),
            recompute=os.environ.get("TOKENDANCE_RECOMPUTE") or DEFAULT_POLICY,
            base_align=_env_int("TOKENDANCE_BASE_ALIGN", 1),
            max_gap=_env_int("TOKENDANCE_MAX_GAP", 64),
            max_drift=_env_int("TOKENDANCE_MAX_DRIFT", 512),
            test_faults=os.environ.get(ENV_FAULTS, ""),
            page_select=_env_bool("TOKENDANCE_PAGE_SELECT", True),
        )
        for k, v in (overrides or {}).items():
            if not hasattr(cfg, k):
                continue
            if isinstance(getattr(cfg, k), bool) and isinstance(v, str):
                v = v.strip().lower() not in ("0", "false", "no", "off")
            setattr(cfg, k, type(getattr(cfg, k))(v))
        if cfg.min_segment_len < 1:
            raise ValueError("min_segment_len must be >= 1")
        parse_policy(cfg.recompute)  # a clear error at start-up
        Faults.parse(cfg.test_faults)
        if cfg.base_align < 1 or cfg.max_gap < 0 or cfg.max_drift < 0:
            raise ValueError("base_align must be >= 1, max_gap and max_drift >= 0")
        return cfg
