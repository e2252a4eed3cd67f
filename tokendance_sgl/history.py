"""The history workload: append-only agent histories, the shape of the paper's multi-agent rounds.

Every agent keeps its whole chat history. Its prompt of round ``r`` is its previous prompt, its own output, the new
round's gathered block (everyone's last answers) and its task, as ChatML turns::

    <|im_start|>system\\n PERSONA <|im_end|>\\n<|im_start|>user\\n OPENING TASK <|im_end|>\\n<|im_start|>assistant\\n
    OUTPUT_0 <|im_end|>\\n<|im_start|>user\\n HEADER {LABEL_j SEGMENT_j "\\n"} TASK <|im_end|>\\n<|im_start|>assistant\\n
    OUTPUT_1 <|im_end|>\\n ... (one user turn per round)

so the gathered blocks become most of every prompt as rounds go by. With ``turns=2`` every round has two assistant
turns: the first answers the round's user message (with the block) by thinking aloud, the second is asked for the
final answer; only the final answer is shared with the others (``td_out_seg``) in the next round's block.

A request's history holds its earlier outputs as the raw generated ids (the KV a server cached for them), each
closed with ``<|im_end|>`` when the generation did not stop on it; the blocks hold the cleaned outputs
(:func:`tokendance_sgl.chat_ids.clean_output`). The segment table names every gathered segment in the prompt
(all rounds so far). Rounds and turns must be built in order once per run.
"""

from __future__ import annotations

from typing import Any, Sequence

from tokendance_sgl.chat_ids import IM_END, IM_START
from tokendance_sgl.workloads import AgentRequest, Workload, _rng

__all__ = ["HistoryWorkload", "THINK", "ANSWER"]

THINK = " Think it over first: say in a few sentences what you know and what you could do."
ANSWER = "Now give your final answer in one or two sentences."


class HistoryWorkload(Workload):
    """A :class:`~tokendance_sgl.workloads.Workload` whose agents keep their whole history (module docstring).

    ``turns``: assistant turns per round (1: answer at once; 2: think, then answer). Other arguments as the base
    class; the private part is the persona alone (the history replaces the base's memory of own outputs)."""

    def __init__(self, style: str = "generative_agents", n_agents: int = 4, n_rounds: int = 3, seed: int = 0, *,
                 turns: int = 1, **kwargs: Any):
        if turns not in (1, 2):
            raise ValueError(f"turns must be 1 or 2, got {turns!r}")
        kwargs.setdefault("memory_cap", 0)
        super().__init__(style, n_agents, n_rounds, seed, **kwargs)
        self.turns = int(turns)
        self._prompt: dict[int, list[int]] = {}  # agent -> its last prompt
        self._segs: dict[int, list[tuple[str, int, int]]] = {}  # agent -> every gathered span of that prompt
        self._private: dict[int, int] = {}  # agent -> tokens of its own context before this round's block

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "history": True, "turns": self.turns}

    def _closed(self, out: Sequence[int]) -> list[int]:
        """A generated output as it stays in the history: raw ids, closed with ``<|im_end|>``."""
        ids = [int(x) for x in out]
        end = self.encode(IM_END)
        return ids if ids[-len(end):] == end else ids + end

    def _request(self, r: int, i: int, ids: list[int], segs: list, *, task_tokens: int, kind: str,
                 final: bool) -> AgentRequest:
        self._prompt[i], self._segs[i] = ids, segs
        cp: dict[str, Any] = {"td_round": r, "td_agent": i, "td_seg_ids": [s[0] for s in segs],
                              "td_seg_starts": [s[1] for s in segs], "td_seg_ends": [s[2] for s in segs]}
        if final:
            cp["td_out_seg"] = self.segment_id(r, i)
        if self.namespace:
            cp["td_ns"] = self.namespace
        sp = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
              "stop_token_ids": list(self.stop_ids)}
        return AgentRequest(round=r, agent=i, input_ids=ids, custom_params=cp, sampling_params=sp, segments=segs,
                            out_seg=self.segment_id(r, i) if final else "", task_kind=kind,
                            private_tokens=self._private[i], base_private_tokens=len(self.agents[i].persona_ids),
                            task_tokens=task_tokens, shared_tokens=sum(e - s for _, s, e in segs))

    def build_round(self, r: int, previous_outputs: dict[int, Sequence[int]] | None = None) -> list[AgentRequest]:
        """The first turn of round ``r``; ``previous_outputs``: every agent's raw output of the last turn of round
        ``r - 1`` (none for round 0)."""
        if not 0 <= r < self.n_rounds:
            raise ValueError(f"round {r} out of range [0, {self.n_rounds})")
        if r > 0 and (previous_outputs is None or set(previous_outputs) != set(range(self.n_agents))):
            raise ValueError(f"round {r} needs the outputs of all {self.n_agents} agents of round {r - 1}")
        if r == 0:
            self._prompt.clear()
            self._segs.clear()
        user = self.encode(f"{IM_START}user\n")
        asst = self.encode(f"{IM_END}\n{IM_START}assistant\n")
        newline = self.encode("\n")
        shared = {j: self.clean(previous_outputs[j]) for j in range(self.n_agents)} if r > 0 else {}
        reqs = []
        for i, agent in enumerate(self.agents):
            rng = _rng(self.seed, self.style, "round", r, "agent", i)
            if r == 0:
                ids = self.encode(f"{IM_START}system\n") + agent.persona_ids + self.encode(f"{IM_END}\n") + user
                ids += self.encode(self._opening(_rng(self.seed, self.style, "opening")))
                segs: list = []
            else:
                ids = self._prompt[i] + self._closed(previous_outputs[i]) + newline + user + self.encode(self._header())
                segs = list(self._segs[i])
            self._private[i] = len(ids) - sum(e - s for _, s, e in segs)
            for j in (self.shared_order(r, i) if r > 0 else ()):
                ids += self.encode(self.agents[j].label)
                segs.append((self.segment_id(r - 1, j), len(ids), len(ids) + len(shared[j])))
                ids += shared[j] + newline
            kind, task = self._task(r, i, rng)
            if self.turns == 2:
                task = task + self.encode(THINK)
            reqs.append(self._request(r, i, ids + task + asst, segs, task_tokens=len(task), kind=kind,
                                      final=self.turns == 1))
        return reqs

    def build_turn(self, r: int, turn: int, outputs: dict[int, Sequence[int]]) -> list[AgentRequest]:
        """Turn ``turn >= 1`` of round ``r``: every agent's previous turn, its output ``outputs[i]`` and the
        follow-up question."""
        if not 1 <= turn < self.turns:
            raise ValueError(f"turn {turn} out of range [1, {self.turns})")
        follow = self.encode("\n" + f"{IM_START}user\n" + ANSWER + f"{IM_END}\n{IM_START}assistant\n")
        reqs = []
        for i in range(self.n_agents):
            self._private[i] = len(self._prompt[i]) - sum(e - s for _, s, e in self._segs[i])
            ids = self._prompt[i] + self._closed(outputs[i]) + follow
            reqs.append(self._request(r, i, ids, list(self._segs[i]), task_tokens=len(follow), kind="answer",
                                      final=turn == self.turns - 1))
        return reqs
