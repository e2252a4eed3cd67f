"""Program-side state of the TokenDance frontend: the pieces a state's text is made of, gathered blocks, the
program's known texts and rounds, and the fork hook that records which ``s.fork(n)`` made each state.

Used by :class:`tokendance_sgl.endpoint.TokenDanceEndpoint` (the token-id mirror of every state) and by
:func:`tokendance_sgl.lang.gather`. It lives on SGLang's frontend objects (``StreamExecutor``), in the client
process.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.lang.interpreter import StreamExecutor

__all__ = ["Piece", "Block", "ProgramContext", "ForkGroup", "ForkInfo", "Output", "Mirror", "install_fork_hook",
           "fork_info", "program_round", "program_context", "program_log"]


# ------------------------------------------------------------------------------------------------------------------
# Pieces and blocks
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A run of text with its token ids. ``seg_id`` set: the ids are (a prefix of) the output of the request that
    registered that segment, and the piece is sent as a segment span."""

    text: str
    ids: Optional[tuple] = None  # None: not tokenized (a block built for a backend without a tokenizer)
    seg_id: Optional[str] = None


class Block(str):
    """A gathered block: its text (it *is* a ``str``), plus the exact pieces it was built from.

    Attributes: ``pieces`` (tuple of :class:`Piece`), ``round`` (the round whose outputs it holds), ``names`` and
    ``indices`` (agent name and fork index per gathered state, in block order), ``outputs`` (each agent's output
    text, as placed in the block)."""

    pieces: tuple
    round: int
    names: tuple
    indices: tuple
    outputs: tuple

    def __new__(cls, pieces: Iterable[Piece], *, round: int, names: Sequence[str], indices: Sequence[int],
                outputs: Sequence[str]):
        pieces = tuple(pieces)
        obj = super().__new__(cls, "".join(p.text for p in pieces))
        obj.pieces = pieces
        obj.round = int(round)
        obj.names = tuple(names)
        obj.indices = tuple(indices)
        obj.outputs = tuple(outputs)
        return obj

    @property
    def text(self) -> str:
        return str.__str__(self)

    @property
    def seg_ids(self) -> list:
        """Ids of the segments in the block, in order."""
        return [p.seg_id for p in self.pieces if p.seg_id]

    @property
    def token_ids(self) -> Optional[list]:
        """The block's token ids (None when it was built without a tokenizer)."""
        if any(p.ids is None for p in self.pieces):
            return None
        return [t for p in self.pieces for t in p.ids]

    def __repr__(self) -> str:
        return (f"Block(round={self.round}, agents={list(self.names)}, chars={len(self)}, "
                f"segments={self.seg_ids})")


# ------------------------------------------------------------------------------------------------------------------
# Per-program and per-state bookkeeping (attributes set on SGLang's StreamExecutor objects)
# ------------------------------------------------------------------------------------------------------------------


class ProgramContext:
    """Shared by a root state and every state forked from it: the round, id serials, the known texts."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:8]
        self.round = 0
        self.lock = threading.Lock()
        self._serial = itertools.count()
        self._fork_groups = itertools.count()
        self.known: dict = {}  # text -> tuple[Piece]; later registrations of the same text win

    def next_serial(self) -> int:
        with self.lock:
            return next(self._serial)

    def next_group(self) -> int:
        with self.lock:
            return next(self._fork_groups)

    def add_known(self, text: str, pieces: Sequence[Piece]) -> None:
        if not text or any(p.ids is None for p in pieces):
            return
        with self.lock:
            self.known[text] = tuple(pieces)

    def known_items(self) -> list:
        with self.lock:
            return list(self.known.items())

    def advance_round(self) -> int:
        with self.lock:
            self.round += 1
            return self.round


class ForkGroup:
    """One ``s.fork(n)`` call."""

    def __init__(self, parent: StreamExecutor, size: int, serial: int):
        self.parent = parent
        self.size = size
        self.serial = serial

    def __repr__(self) -> str:
        return f"ForkGroup(#{self.serial}, size={self.size})"


@dataclass
class ForkInfo:
    group: ForkGroup
    index: int


@dataclass
class Output:
    """A ``gen`` or ``select`` result of one state, as the mirror holds it."""

    kind: str  # "gen" | "select"
    text: str
    pieces: tuple
    round: int
    seg_id: Optional[str] = None
    meta_info: Any = None


class Mirror:
    """Token ids of a state's text: ``text`` is exactly the text the ids stand for; ``segs`` are segment spans."""

    __slots__ = ("text", "ids", "segs", "marks")

    def __init__(self):
        self.text = ""
        self.ids: list = []
        self.segs: list = []  # (seg_id, start, end)
        self.marks: list = [(0, 0, 0)]  # piece boundaries: (len(text), len(ids), len(segs))

    def copy(self) -> "Mirror":
        m = Mirror()
        m.text, m.ids, m.segs, m.marks = self.text, list(self.ids), list(self.segs), list(self.marks)
        return m

    def append(self, piece: Piece) -> None:
        if not piece.text and not piece.ids:
            return
        start = len(self.ids)
        self.text += piece.text
        self.ids.extend(piece.ids)
        if piece.seg_id and piece.ids:
            self.segs.append((piece.seg_id, start, len(self.ids)))
        self.marks.append((len(self.text), len(self.ids), len(self.segs)))

    def truncate(self, n_chars: int) -> None:
        """Keeps the longest prefix of whole pieces whose text has at most ``n_chars`` characters."""
        i = bisect.bisect_right([m[0] for m in self.marks], n_chars) - 1
        t, k, s = self.marks[i]
        self.text = self.text[:t]
        del self.ids[k:]
        del self.segs[s:]
        del self.marks[i + 1:]


def program_context(exe: StreamExecutor) -> ProgramContext:
    ctx = getattr(exe, "_td_ctx", None)
    if ctx is None:
        ctx = ProgramContext()
        exe._td_ctx = ctx
    return ctx


def program_log(exe: StreamExecutor) -> list:
    log = getattr(exe, "_td_log", None)
    if log is None:
        log = []
        exe._td_log = log
    return log


def fork_info(exe: StreamExecutor) -> Optional[ForkInfo]:
    """Which ``s.fork(n)`` call created this executor (None for a state that was not forked)."""
    return getattr(exe, "_td_fork", None)


def program_round(exe: StreamExecutor) -> int:
    return program_context(exe).round


# ------------------------------------------------------------------------------------------------------------------
# The fork hook
# ------------------------------------------------------------------------------------------------------------------

_hook_lock = threading.Lock()


def install_fork_hook() -> None:
    """Wraps ``StreamExecutor.fork`` once (see the module docstring)."""
    with _hook_lock:
        if getattr(StreamExecutor.fork, "_tokendance_hook", False):
            return
        original = StreamExecutor.fork

        @functools.wraps(original)
        def fork(self, size: int = 1, position_ids_offset: Optional[List[int]] = None):
            exes = original(self, size, position_ids_offset)
            ctx = program_context(self)
            group = ForkGroup(self, len(exes), ctx.next_group())
            for i, e in enumerate(exes):
                e._td_ctx = ctx
                e._td_fork = ForkInfo(group, i)
                e._td_log = []
                e._td_mark = 0  # index into _td_log where "new output since the fork / last gather" starts
                e._td_vars = dict(e.variables)  # variables at the fork / last gather (for other backends)
            if getattr(self.backend, "td_wants_fork_events", False):
                self.backend.fork_program(self, exes, position_ids_offset)
            return exes

        fork._tokendance_hook = True
        StreamExecutor.fork = fork
