"""Seeded All-Gather workloads for multi-agent rounds, built on token ids.

Two styles:

* ``generative_agents`` -- a small village in the spirit of GenerativeAgents: every agent has a persona, rules
  and a memory stream (300-600 tokens by default), sees a block with every agent's output of the last round and
  gets a task (plan the next hour, reply in a conversation, react to an event).
* ``agent_society`` -- a city social feed in the spirit of AgentSociety: short profiles, short posts, many agents.

A request of round ``r`` for agent ``i`` is built from separately tokenized pieces (``add_special_tokens=False``)
and the raw generated ids of the previous round, concatenated as ids, in ChatML framing::

    <|im_start|>system\\n  PRIVATE(persona, rules, memory, own recent outputs)  <|im_end|>\\n<|im_start|>user\\n
    HEADER  { LABEL_j  SEGMENT_j  "\\n" }  for every agent j (round r >= 1; round 0 has an opening event instead)
    TASK  <|im_end|>\\n<|im_start|>assistant\\n

``SEGMENT_j`` is exactly the id list agent ``j`` generated in round ``r-1`` (after :func:`~tokendance_sgl.chat_ids.clean_output`), so the
same ids appear in every agent's prompt.  Each request carries its segment table in
``sampling_params.custom_params`` (see :mod:`tokendance_sgl.segments`): ``td_round``, ``td_agent``, ``td_seg_ids`` (``"r{r-1}/a{j}"``),
``td_seg_starts``/``td_seg_ends`` (token offsets into ``input_ids``) and ``td_out_seg`` (``"r{r}/a{i}"``).

Output cleaning: trailing stop/EOS ids (``<|im_end|>``, the tokenizer's EOS, ``<|endoftext|>``) are stripped from a
generated output before it is used as a segment.  If nothing is left (the model stopped at once) the segment is
the fixed filler :data:`~tokendance_sgl.chat_ids.EMPTY_OUTPUT_FILLER` tokenized on its own, so a shared block is never empty; such a segment
is not the producing request's generated ids, so a server that registered the raw output will see it as new.

Every random choice goes through ``random.Random`` instances seeded from the workload seed and the purpose
(agents, round, agent), so a workload is deterministic per seed and ``build_round`` does not depend on the order
in which rounds or agents are built.  :meth:`Workload.fake_outputs` and :func:`simulate` produce seeded simulated
outputs, for tests and offline inspection without a server.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from tokendance_sgl.chat_ids import EMPTY_OUTPUT_FILLER, IM_END, IM_START, clean_output, load_tokenizer, stop_token_ids
from tokendance_sgl.workload_text import (
    AS_DISTRICTS, AS_FEED_MEMORY, AS_FIRST, AS_GUIDELINES, AS_INTERESTS, AS_JOBS, AS_MOODS, AS_NEWS, AS_RULES,
    AS_STANCES, AS_SUFFIX, AS_TOPICS, FAKE_AS, FAKE_GA, GA_ACTIVITIES, GA_CONCERNS, GA_DAYS, GA_EVENTS, GA_EXTRA_FIRST,
    GA_EXTRA_HOMES, GA_EXTRA_JOBS, GA_EXTRA_LAST, GA_GUIDELINES, GA_HABITS, GA_PEOPLE, GA_PLACES, GA_QUESTIONS,
    GA_RELATIONS, GA_RULES, GA_TIMES, GA_TRAITS, VILLAGE,
)

STYLES = ("generative_agents", "agent_society")
STYLE_ALIASES = {
    "ga": "generative_agents",
    "generative-agents": "generative_agents",
    "generativeagents": "generative_agents",
    "generative_agents": "generative_agents",
    "as": "agent_society",
    "agent-society": "agent_society",
    "agentsociety": "agent_society",
    "agent_society": "agent_society",
}
ORDERS = ("same", "permuted")


@dataclass
class Agent:
    id: int
    name: str  # display name (GA) or handle without "@" (AS)
    label: str  # how the agent is named in the shared block, e.g. "Maya Okafor:\n"
    persona: str  # persona + rules + static memories (the base private part, as text)
    persona_ids: list[int]


@dataclass
class AgentRequest:
    """One agent's request of one round."""

    round: int
    agent: int
    input_ids: list[int]
    custom_params: dict[str, Any]
    sampling_params: dict[str, Any]
    #: (segment id, start, end) for every shared output in ``input_ids``, sorted by start.
    segments: list[tuple[str, int, int]]
    out_seg: str
    task_kind: str
    private_tokens: int  # tokens of the private system content (persona, rules, memories, own recent outputs)
    base_private_tokens: int  # the part of it that does not grow (persona, rules, static memories)
    task_tokens: int  # tokens of the task text
    shared_tokens: int  # tokens inside segment spans

    def payload(self, **sampling_overrides: Any) -> dict[str, Any]:
        """The JSON body for SGLang's ``POST /generate``."""
        sp = dict(self.sampling_params)
        sp.update(sampling_overrides)
        sp["custom_params"] = dict(self.custom_params)
        return {"input_ids": list(self.input_ids), "sampling_params": sp}

    def decode(self, tokenizer: Any, *, mark_segments: bool = False) -> str:
        """The prompt as text (for display). With ``mark_segments`` every span is wrapped in ``[[id| ... ]]``."""
        if not mark_segments:
            return tokenizer.decode(self.input_ids)
        parts, pos = [], 0
        for sid, s, e in self.segments:
            parts.append(tokenizer.decode(self.input_ids[pos:s]))
            parts.append(f"[[{sid}|" + tokenizer.decode(self.input_ids[s:e]) + "]]")
            pos = e
        parts.append(tokenizer.decode(self.input_ids[pos:]))
        return "".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _rng(seed: int, *parts: Any) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across processes and PYTHONHASHSEED.
    return random.Random("/".join([str(seed), *map(str, parts)]))


def _check_range(name: str, rng_: tuple[int, int]) -> tuple[int, int]:
    lo, hi = int(rng_[0]), int(rng_[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {rng_!r}")
    return lo, hi


# --------------------------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------------------------

STYLE_DEFAULTS = {
    "generative_agents": dict(private_tokens=(300, 600), task_tokens=(50, 150), max_new_tokens=32, memory_cap=128),
    "agent_society": dict(private_tokens=(90, 160), task_tokens=(25, 60), max_new_tokens=24, memory_cap=48),
}


class Workload:
    """A seeded All-Gather workload.

    Parameters
    ----------
    style: ``"generative_agents"`` (alias ``"ga"``) or ``"agent_society"`` (alias ``"as"``).
    n_agents, n_rounds, seed: sizes and the seed of every random choice.
    tokenizer: a HF tokenizer object, a model directory, or ``None`` for the default model.
    private_tokens: (lo, hi) tokens of the base private part (persona, rules, static memories); the actual length
        per agent is drawn from this range.  Own recent outputs are added on top, capped at ``memory_cap`` tokens.
    task_tokens: (lo, hi) tokens of the task text of one request.
    max_new_tokens: default ``max_new_tokens`` of the requests (the runner may override it).
    order: ``"same"`` (shared block in agent order for everyone) or ``"permuted"`` (a seeded permutation per agent
        and round).
    memory_cap: the most tokens of the agent's own previous outputs kept in its private part (0 disables).
    namespace: if not empty, sent as ``td_ns`` in every request.
    """

    def __init__(
        self,
        style: str = "generative_agents",
        n_agents: int = 4,
        n_rounds: int = 3,
        seed: int = 0,
        *,
        tokenizer: Any = None,
        private_tokens: tuple[int, int] | None = None,
        task_tokens: tuple[int, int] | None = None,
        max_new_tokens: int | None = None,
        order: str = "same",
        memory_cap: int | None = None,
        namespace: str = "",
        temperature: float = 0.0,
    ) -> None:
        key = STYLE_ALIASES.get(str(style).lower())
        if key is None:
            raise ValueError(f"unknown workload style {style!r}; choose one of {STYLES}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if n_agents < 1 or n_rounds < 1:
            raise ValueError("n_agents and n_rounds must be >= 1")
        d = STYLE_DEFAULTS[key]
        self.style = key
        self.n_agents = int(n_agents)
        self.n_rounds = int(n_rounds)
        self.seed = int(seed)
        self.order = order
        self.private_tokens = _check_range("private_tokens", private_tokens or d["private_tokens"])
        self.task_tokens = _check_range("task_tokens", task_tokens or d["task_tokens"])
        self.max_new_tokens = int(max_new_tokens if max_new_tokens is not None else d["max_new_tokens"])
        self.memory_cap = int(memory_cap if memory_cap is not None else d["memory_cap"])
        self.namespace = namespace
        self.temperature = float(temperature)
        self.tokenizer = load_tokenizer(tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._cache: dict[str, list[int]] = {}
        self.filler_ids = self.encode(EMPTY_OUTPUT_FILLER)
        self.agents = self._make_agents()
        # Own outputs seen so far, per round: round -> {agent: cleaned ids}; filled by build_round.
        self._history: dict[int, dict[int, list[int]]] = {}

    # ------------------------------------------------------------------ basics

    def describe(self) -> dict[str, Any]:
        return {
            "style": self.style,
            "n_agents": self.n_agents,
            "n_rounds": self.n_rounds,
            "seed": self.seed,
            "order": self.order,
            "private_tokens": list(self.private_tokens),
            "task_tokens": list(self.task_tokens),
            "max_new_tokens": self.max_new_tokens,
            "memory_cap": self.memory_cap,
            "namespace": self.namespace,
        }

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without special tokens (memoised)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            self._cache[text] = ids
        return list(ids)

    def _encode_nocache(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def clean(self, ids: Sequence[int]) -> list[int]:
        """An output as it is used in the next round (see :func:`clean_output`)."""
        return clean_output(ids, self.stop_ids, self.filler_ids)

    @staticmethod
    def segment_id(round_: int, agent: int) -> str:
        return f"r{round_}/a{agent}"

    # ------------------------------------------------------------------ agents

    def _pad_to(self, rng: random.Random, head: str, pool: list[str], lo: int, hi: int, sep: str = " ") -> list[int]:
        """Tokenize ``head`` plus sentences drawn from ``pool`` until the length reaches a target in [lo, hi]."""
        target = rng.randint(lo, hi)
        text = head
        ids = self._encode_nocache(text)
        bag: list[str] = []
        guard = 0
        while len(ids) < target and guard < 10_000:
            if not bag:  # draw without replacement; refill when the pool is used up
                bag = list(pool)
                rng.shuffle(bag)
            text = text + sep + bag.pop()
            ids = self._encode_nocache(text)
            guard += 1
        if len(ids) > hi:
            ids = ids[:hi]
        return ids

    def _make_agents(self) -> list[Agent]:
        rng = _rng(self.seed, self.style, "agents")
        lo, hi = self.private_tokens
        if self.style == "generative_agents":
            people = list(GA_PEOPLE)
            rng.shuffle(people)
            used = {p[0] for p in people}
            while len(people) < self.n_agents:
                name = f"{rng.choice(GA_EXTRA_FIRST)} {rng.choice(GA_EXTRA_LAST)}"
                if name in used:
                    continue
                used.add(name)
                people.append((name, rng.randint(18, 80), rng.choice(GA_EXTRA_JOBS), rng.choice(GA_EXTRA_HOMES),
                               rng.choice(["she", "he"])))
            people = people[: self.n_agents]
            names = [p[0] for p in people]
            agents = []
            for i, (name, age, job, home, pron) in enumerate(people):
                first = name.split()[0]
                poss = "her" if pron == "she" else "his"
                traits = rng.sample(GA_TRAITS, 3)
                others = [n for n in names if n != name] or ["a neighbour"]
                friend = rng.choice(others)
                head = (
                    f"{name} is a {age}-year-old {job} in {VILLAGE}, living in {home}. "
                    f"{first} is {traits[0]}, {traits[1]} and {traits[2]}. {first} {rng.choice(GA_HABITS)}. "
                    f"Lately {pron} has been worried about {rng.choice(GA_CONCERNS)}. "
                    f"{first} knows {friend} as {rng.choice(GA_RELATIONS)}.\n"
                    + GA_RULES.format(name=name)
                    + f"\n\n{first}'s memories from the past days:"
                )
                pool = []
                for _ in range(40):
                    act = rng.choice(GA_ACTIVITIES).format(other=rng.choice(others))
                    pool.append(
                        f"\n- {rng.choice(GA_DAYS)} {rng.choice(GA_TIMES)}: at {rng.choice(GA_PLACES)}, "
                        f"{first} {act}."
                    )
                ids = self._pad_to(rng, head, pool, lo, hi, sep="")
                agents.append(Agent(i, name, f"{name}:\n", self.tokenizer.decode(ids), ids))
            return agents

        handles: list[str] = []
        while len(handles) < self.n_agents:
            h = rng.choice(AS_FIRST) + rng.choice(AS_SUFFIX)
            if h not in handles:
                handles.append(h)
            if len(handles) < self.n_agents and len(handles) >= len(AS_FIRST) * len(AS_SUFFIX):
                handles.append(f"user{len(handles)}")
        agents = []
        for i, h in enumerate(handles):
            others = [x for x in handles if x != h] or ["someone"]
            follows = rng.sample(others, min(3, len(others)))
            interests = rng.sample(AS_INTERESTS, 2)
            district = rng.choice(AS_DISTRICTS)
            head = (
                f"Profile: @{h} | age {rng.randint(16, 79)} | {rng.choice(AS_JOBS)} | lives in {district} | "
                f"likes {interests[0]} and {interests[1]} | {rng.choice(AS_STANCES)} | mood: {rng.choice(AS_MOODS)} | "
                f"follows " + ", ".join("@" + f for f in follows) + "\n" + AS_RULES.format(handle=h) + "\nRecently you:"
            )
            pool = []
            for _ in range(20):
                pool.append(
                    " "
                    + rng.choice(AS_FEED_MEMORY).format(
                        interest=rng.choice(AS_INTERESTS), district=rng.choice(AS_DISTRICTS),
                        topic=rng.choice(AS_TOPICS), mood=rng.choice(AS_MOODS), other=rng.choice(others),
                    )
                    + ";"
                )
            ids = self._pad_to(rng, head, pool, lo, hi, sep="")
            agents.append(Agent(i, h, f"@{h}:\n", self.tokenizer.decode(ids), ids))
        return agents

    # ------------------------------------------------------------------ pieces

    def _header(self) -> str:
        return "Last round, everyone said:\n" if self.style == "generative_agents" else "Latest posts on the feed:\n"

    def _opening(self, rng: random.Random) -> str:
        if self.style == "generative_agents":
            return f"It is {rng.choice(GA_DAYS)} morning in {VILLAGE}. News of the day: {rng.choice(GA_EVENTS)}\n"
        return f"Breaking on the city feed: {rng.choice(AS_NEWS)}\n"

    def _task(self, r: int, i: int, rng: random.Random) -> tuple[str, list[int]]:
        lo, hi = self.task_tokens
        agent = self.agents[i]
        others = [a.name for a in self.agents if a.id != i] or ["a neighbour"]
        if self.style == "generative_agents":
            first = agent.name.split()[0]
            kind = rng.choice(["plan", "converse", "react"])
            time = GA_TIMES[(r * 3 + i) % len(GA_TIMES)]
            if kind == "plan":
                head = (f"It is now {time}. Plan the next hour for {first}: say what you will do, where, "
                        f"and with whom.")
            elif kind == "converse":
                head = (f"{rng.choice(others)} meets {first} at {rng.choice(GA_PLACES)} and asks: "
                        f"\"{rng.choice(GA_QUESTIONS)}\" Reply as {first}.")
            else:
                head = (f"Something just happened: {rng.choice(GA_EVENTS)} How does {first} react? "
                        f"Say what you feel and what you do next.")
            head = "Your task: " + head + " Guidelines:"
            pool = [" " + g for g in GA_GUIDELINES]
        else:
            kind = rng.choice(["post", "reply", "react"])
            if kind == "post":
                head = f"Write a post about {rng.choice(AS_TOPICS)}."
            elif kind == "reply":
                head = f"Reply to @{rng.choice(others)} about {rng.choice(AS_TOPICS)}."
            else:
                head = f"News just in: {rng.choice(AS_NEWS)} React in one post."
            head = "Now: " + head
            pool = [" " + g for g in AS_GUIDELINES]
        return kind, self._pad_to(rng, head, pool, lo, hi, sep="")

    def _memory_ids(self, r: int, i: int) -> list[int]:
        """The agent's own previous outputs (most recent last), capped at ``memory_cap`` tokens."""
        if self.memory_cap <= 0 or r == 0:
            return []
        title = self.encode("\n\nThings you said recently:")
        bullet = self.encode("\n- ")
        entries: list[list[int]] = []
        budget = self.memory_cap
        for rr in range(r - 1, -1, -1):
            out = self._history.get(rr, {}).get(i)
            if out is None:
                break
            if len(out) > budget:
                if not entries:
                    entries.append(out[:budget])
                break
            entries.append(out)
            budget -= len(out)
        if not entries:
            return []
        ids = list(title)
        for e in reversed(entries):
            ids += bullet + e
        return ids

    def shared_order(self, r: int, i: int) -> list[int]:
        """The order of the agents' outputs in agent ``i``'s shared block of round ``r``."""
        order = list(range(self.n_agents))
        if self.order == "permuted":
            _rng(self.seed, self.style, "order", r, i).shuffle(order)
        return order

    # ------------------------------------------------------------------ rounds

    def build_round(self, r: int, previous_outputs: dict[int, Sequence[int]] | None = None) -> list[AgentRequest]:
        """The requests of round ``r``.

        ``previous_outputs`` maps every agent id to its generated ids of round ``r-1`` (raw: trailing stop ids are
        stripped here).  Round 0 takes none.  Rounds must be built in order once per run (the agents' memories of
        their own outputs are recorded here); building a round again with the same inputs gives the same requests.
        """
        if not 0 <= r < self.n_rounds:
            raise ValueError(f"round {r} out of range [0, {self.n_rounds})")
        shared: dict[int, list[int]] = {}
        if r > 0:
            if previous_outputs is None or set(previous_outputs) != set(range(self.n_agents)):
                raise ValueError(f"round {r} needs the outputs of all {self.n_agents} agents of round {r - 1}")
            shared = {j: self.clean(previous_outputs[j]) for j in range(self.n_agents)}
            self._history[r - 1] = shared
            for rr in [k for k in self._history if k >= r]:
                del self._history[rr]
        else:
            self._history.clear()

        sys_open = self.encode(f"{IM_START}system\n")
        sys_close = self.encode(f"{IM_END}\n{IM_START}user\n")
        asst = self.encode(f"{IM_END}\n{IM_START}assistant\n")
        newline = self.encode("\n")
        header = self.encode(self._header())
        reqs = []
        for i, agent in enumerate(self.agents):
            rng = _rng(self.seed, self.style, "round", r, "agent", i)
            mem = self._memory_ids(r, i)
            ids = sys_open + agent.persona_ids + mem + sys_close
            segs: list[tuple[str, int, int]] = []
            if r == 0:
                ids += self.encode(self._opening(_rng(self.seed, self.style, "opening")))
            else:
                ids += header
                for j in self.shared_order(r, i):
                    ids += self.encode(self.agents[j].label)
                    start = len(ids)
                    ids += shared[j]
                    segs.append((self.segment_id(r - 1, j), start, len(ids)))
                    ids += newline
            kind, task = self._task(r, i, rng)
            ids += task + asst
            out_seg = self.segment_id(r, i)
            cp: dict[str, Any] = {
                "td_round": r,
                "td_agent": i,
                "td_seg_ids": [s[0] for s in segs],
                "td_seg_starts": [s[1] for s in segs],
                "td_seg_ends": [s[2] for s in segs],
                "td_out_seg": out_seg,
            }
            if self.namespace:
                cp["td_ns"] = self.namespace
            sp = {
                "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature,
                "stop_token_ids": list(self.stop_ids),
            }
            reqs.append(
                AgentRequest(
                    round=r, agent=i, input_ids=ids, custom_params=cp, sampling_params=sp, segments=segs,
                    out_seg=out_seg, task_kind=kind, private_tokens=len(agent.persona_ids) + len(mem),
                    base_private_tokens=len(agent.persona_ids), task_tokens=len(task),
                    shared_tokens=sum(e - s for _, s, e in segs),
                )
            )
        return reqs

    # ------------------------------------------------------------------ offline simulation

    def fake_outputs(self, r: int, *, max_new_tokens: int | None = None) -> dict[int, list[int]]:
        """Seeded simulated raw outputs of round ``r``: a short in-style sentence per agent, cut at
        ``max_new_tokens``; an output that was not cut ends with the stop id, as a real generation does."""
        limit = int(max_new_tokens or self.max_new_tokens)
        stop = self.stop_ids[0] if self.stop_ids else None
        outs: dict[int, list[int]] = {}
        for i, agent in enumerate(self.agents):
            rng = _rng(self.seed, self.style, "fake", r, i)
            others = [a.name for a in self.agents if a.id != i] or ["someone"]
            if self.style == "generative_agents":
                text = rng.choice(FAKE_GA).format(other=rng.choice(others).split()[0], place=rng.choice(GA_PLACES))
            else:
                text = rng.choice(FAKE_AS).format(topic=rng.choice(AS_TOPICS), district=rng.choice(AS_DISTRICTS),
                                                  other=rng.choice(others), mood=rng.choice(AS_MOODS))
            ids = self.encode(text)
            if len(ids) >= limit or stop is None:
                ids = ids[:limit]
            else:
                ids = ids + [stop]
            outs[i] = ids
        return outs


def simulate(workload: Workload, *, max_new_tokens: int | None = None) -> list[tuple[list[AgentRequest], dict[int, list[int]]]]:
    """Run a workload offline with :meth:`Workload.fake_outputs`: per round and turn, (requests, raw outputs)."""
    rounds = []
    prev: dict[int, list[int]] | None = None
    for r in range(workload.n_rounds):
        for t in range(int(getattr(workload, "turns", 1))):
            reqs = workload.build_round(r, prev) if t == 0 else workload.build_turn(r, t, prev)
            prev = workload.fake_outputs(r, max_new_tokens=max_new_tokens)
            rounds.append((reqs, prev))
    return rounds


def make_workload(style: str = "generative_agents", **kwargs: Any) -> Workload:
    """Convenience constructor (same arguments as :class:`Workload`)."""
    return Workload(style, **kwargs)


__all__ = [
    "Agent",
    "AgentRequest",
    "ORDERS",
    "STYLES",
    "Workload",
    "make_workload",
    "simulate",
]
