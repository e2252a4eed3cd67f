"""``gather``: the All-Gather step that SGLang's frontend lacks, for ``@sgl.function`` programs.

``s.fork(n)`` gives ``n`` agents that continue from one prefix; SGLang's ``join`` only copies their variables back
into the parent.  :func:`gather` waits for the forks, takes each fork's new output (since the fork, or since its last
gather), builds one shared block with the agents' names, appends it to **every** fork (and the parent if asked) and
advances the program's round::

    import tokendance_sgl  # first: CPU bootstrap
    import sglang as sgl
    from tokendance_sgl.lang import TokenDanceEndpoint, gather

    @sgl.function
    def meeting(s, names, rounds):
        s += sgl.system("A village meeting. Everyone answers in one short sentence.")
        agents = s.fork(len(names))
        for r in range(rounds):
            agents += lambda i: sgl.user(f"You are {names[i]}. What do you say?") + sgl.assistant(
                sgl.gen("say", max_tokens=24, stop="\\n"))
            gather(agents, var="say", names=names, header="The meeting so far:\\n", role="user")
        return [a["say"] for a in agents]

    state = meeting.run(names=["Maya", "Tomas", "Priya"], rounds=2, temperature=0,
                        backend=TokenDanceEndpoint("http://127.0.0.1:30000"))

With :class:`~tokendance_sgl.endpoint.TokenDanceEndpoint` every agent's copy of the block has identical token ids,
each output in it is a segment span naming the request that produced it, and the requests carry the round, so a
``--kv-backend tokendance`` server computes the block's KV once and shares it.  With any other backend (e.g. SGLang's
``RuntimeEndpoint``) ``gather`` appends the same text, without segments.

Block format (all configurable)::

    header
    item (once per agent, "{output}" replaced by the agent's outputs joined by `joiner`)
    footer

``item`` may use ``{name}``, ``{index}`` (the fork index) and ``{round}``; the default is ``"{name}: {output}\\n"``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.lang.interpreter import ProgramState, ProgramStateGroup, StreamExecutor
from sglang.lang.ir import SglConstantText, SglExprList, SglRoleBegin, SglRoleEnd

from tokendance_sgl.endpoint import TokenDanceEndpoint
from tokendance_sgl.program_state import Block, Piece, fork_info, install_fork_hook, program_context

__all__ = ["gather", "GatherError", "Block", "Piece", "TokenDanceEndpoint"]

_ROLES = ("system", "user", "assistant")


class GatherError(ValueError):
    """A malformed ``gather`` call (raised in the client, before anything is appended)."""


def _states(forks: Any) -> list:
    if isinstance(forks, ProgramStateGroup):
        states = list(forks.states)
    elif isinstance(forks, ProgramState):
        raise GatherError("gather() takes the states of a fork (the result of s.fork(n), or a list of them), "
                          "not a single state")
    elif isinstance(forks, (list, tuple)):
        states = list(forks)
    else:
        raise GatherError(f"gather() takes the result of s.fork(n) or a list of forked states, got "
                          f"{type(forks).__name__}")
    if not states:
        raise GatherError("gather() got no states: pass the states returned by s.fork(n) with n >= 1")
    for i, st in enumerate(states):
        if type(st).__name__ == "TracerProgramState":
            raise GatherError("gather() does not support tracing (program.trace() / compile)")
        if not isinstance(st, ProgramState):
            raise GatherError(f"gather(): item {i} is a {type(st).__name__}, not a state returned by s.fork(n)")
    return states


def _names(names: Any, indices: list) -> list:
    if names is None:
        return [f"Agent {i}" for i in indices]
    if callable(names):
        return [str(names(i)) for i in indices]
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise GatherError(f"gather(): names must be a list of strings (one per state) or a function of the fork "
                          f"index, got {type(names).__name__}")
    if len(names) != len(indices):
        raise GatherError(f"gather(): {len(names)} names for {len(indices)} states")
    return [str(n) for n in names]


def _split_item(item: str) -> tuple:
    if not isinstance(item, str) or item.count("{output}") != 1:
        raise GatherError(f"gather(): item must be a string with exactly one '{{output}}' placeholder, got {item!r}")
    before, after = item.split("{output}")
    for part in (before, after):
        try:
            part.format(name="", index=0, round=0)
        except (KeyError, IndexError, ValueError) as e:
            raise GatherError(f"gather(): bad placeholder in item {item!r} ({e!r}); use {{name}}, {{index}}, "
                              f"{{round}} and {{output}} (double other braces)") from e
    return before, after


def _new_outputs(exe: StreamExecutor, pos: int, var: Union[None, str, Sequence[str]]) -> list:
    """The outputs of one fork since the fork / its last gather: a list of (text, pieces-or-None)."""
    log = getattr(exe, "_td_log", None)
    mark = getattr(exe, "_td_mark", 0)
    snap = getattr(exe, "_td_vars", {})
    if var is None:
        if isinstance(exe.backend, TokenDanceEndpoint) and log is not None:
            outs = [(o.text, o.pieces) for o in log[mark:]]
        else:  # other backends: the variables set since the fork / last gather (gen and select results)
            outs = [(v if isinstance(v, str) else str(v), None) for k, v in exe.variables.items()
                    if isinstance(v, (str, list)) and (k not in snap or snap[k] is not v)]
            outs = [(v[0] if isinstance(v, list) else v, p) for v, p in outs]
        if not outs:
            raise GatherError(f"gather(): fork {pos} produced no output since the fork (or its last gather); "
                              f"run gen/select in every fork before gathering, or pass var=...")
        return outs
    names = [var] if isinstance(var, str) else list(var)
    outs = []
    for name in names:
        if name not in exe.variables:
            raise GatherError(f"gather(): fork {pos} has no variable {name!r}")
        value = exe.variables[name]
        if isinstance(value, list):  # gen(n > 1)
            value = value[0]
        if name in snap and snap[name] is exe.variables[name]:
            raise GatherError(f"gather(): fork {pos} did not produce {name!r} since the fork (or its last gather)")
        pieces = None
        if log is not None:
            for o in reversed(log[mark:]):
                if o.text == value:
                    pieces = o.pieces
                    break
        outs.append((value, pieces))
    return outs


def gather(
    forks: Any,
    *,
    var: Union[None, str, Sequence[str]] = None,
    names: Union[None, Sequence[str], Callable[[int], str]] = None,
    header: str = "",
    item: str = "{name}: {output}\n",
    joiner: str = " ",
    footer: str = "",
    role: Optional[str] = None,
    append: bool = True,
    to_parent: bool = False,
    advance_round: bool = True,
) -> Block:
    """All-Gather for the states of one ``s.fork(n)``; returns the block (a ``str`` subclass, :class:`Block`).

    ``forks``: the ``ProgramStateGroup`` from ``s.fork(n)`` or a list of some of its states (block order = list
    order). ``var``: which output of each fork goes into the block -- a variable name (its value must be new since
    the fork / the fork's last gather), a list of names, or None for every ``gen``/``select`` result since then
    (with backends other than TokenDanceEndpoint: every variable set since then). ``names``: agent names (a list,
    one per state, or a function of the fork index; default ``"Agent {index}"``). ``header``, ``item``, ``joiner``,
    ``footer``: the format (see the module docstring). ``role``: wrap the appended block in that chat role
    (``"user"``, ...); None appends it as plain text where each fork stands (inside an open ``sgl.user_begin()``, for
    instance). ``append=False`` only builds the block: put it into prompts yourself (``sgl.user(block + "...")``);
    the endpoint still finds it there and sends its exact ids. ``to_parent``: append it to the state that forked
    too. ``advance_round``: start the next round (requests after the gather carry ``td_round + 1``).

    Raises :class:`GatherError` for malformed use: no states, states not from one ``s.fork`` call, a state given
    twice, a fork that failed or has ended (joined), a missing variable, a bad format.
    """
    states = _states(forks)
    exes = [st.stream_executor for st in states]
    infos = []
    for i, exe in enumerate(exes):
        info = fork_info(exe)
        if info is None:
            raise GatherError(f"gather(): state {i} was not created by s.fork(n); gather the states returned by one "
                              f"s.fork(n) call")
        infos.append(info)
    group = infos[0].group
    for i, info in enumerate(infos):
        if info.group is not group:
            raise GatherError(f"gather(): states 0 and {i} come from different s.fork() calls ({group!r} and "
                              f"{info.group!r}); gather combines states forked together")
    seen: dict = {}
    for i, info in enumerate(infos):
        if info.index in seen:
            raise GatherError(f"gather(): states {seen[info.index]} and {i} are the same fork (index {info.index})")
        seen[info.index] = i
    if role is not None and role not in _ROLES:
        raise GatherError(f"gather(): role must be one of {_ROLES} or None, got {role!r}")
    before, after = _split_item(item)
    indices = [info.index for info in infos]
    agent_names = _names(names, indices)
    targets = list(exes)
    if to_parent:
        targets.append(group.parent)

    # Wait for every fork (and the parent), then check that each can still take the block.
    for pos, exe in enumerate(targets):
        who = f"fork {pos}" if pos < len(exes) else "the parent state"
        exe.sync()
        if exe.error_ is not None:
            raise GatherError(f"gather(): {who} failed: {exe.error_!r}") from exe.error_
        if getattr(exe, "_td_ended", False) or exe.is_finished or (exe.use_thread and not exe.worker.is_alive()):
            raise GatherError(f"gather(): {who} has ended (joined, or its program returned); gather before join()")
        if role is not None and append and exe.cur_role is not None:
            raise GatherError(f"gather(): {who} is inside an open {exe.cur_role!r} message; close it first or "
                              f"gather with role=None to append the block inside it")

    backend = exes[0].backend
    td = backend if isinstance(backend, TokenDanceEndpoint) else None
    ctx = program_context(group.parent)

    def text(t: str) -> Piece:
        return td.text_piece(t) if td is not None else Piece(t)

    rnd = ctx.round
    pieces: list = []
    outputs: list = []
    if header:
        pieces.append(text(header))
    for pos, (exe, idx, name) in enumerate(zip(exes, indices, agent_names)):
        outs = _new_outputs(exe, pos, var)
        pre = before.format(name=name, index=idx, round=rnd)
        if pre:
            pieces.append(text(pre))
        for k, (value, out_pieces) in enumerate(outs):
            if k and joiner:
                pieces.append(text(joiner))
            if out_pieces is None or td is None:
                if value:
                    pieces.append(text(value))
            else:
                pieces.extend(out_pieces)
        outputs.append(joiner.join(v for v, _ in outs))
        post = after.format(name=name, index=idx, round=rnd)
        if post:
            pieces.append(text(post))
    if footer:
        pieces.append(text(footer))
    block = Block(pieces, round=rnd, names=agent_names, indices=indices, outputs=outputs)

    if td is not None:
        ctx.add_known(block.text, block.pieces)
    for exe in exes:
        exe._td_mark = len(getattr(exe, "_td_log", None) or [])
        exe._td_vars = dict(exe.variables)
    if append:
        body = SglConstantText(block.text)
        expr = SglExprList([SglRoleBegin(role), body, SglRoleEnd(role)]) if role is not None else body
        for exe in targets:
            exe.submit(expr)
    if advance_round:
        ctx.advance_round()
    return block


install_fork_hook()
