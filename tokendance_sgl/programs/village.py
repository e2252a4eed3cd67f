"""A GenerativeAgents-like village as an SGLang program: every hour each villager sees what everyone did in the
last hour, plans, and acts.

    python -m tokendance_sgl.programs.village --url http://127.0.0.1:30000 --agents 4 --rounds 3

Each villager is a fork of one program state with a private persona (system message).  Round ``r``::

    user:      It is <time>. [<event> | What everyone did in the last hour: <gathered block>] Plan your next hour.
    assistant: gen("plan")
    user:      What do you do or say now?
    assistant: gen("act")

after which ``gather(villagers, var="act", ...)`` appends everyone's act, as one block with names, to every
villager's next message (inside an open ``user`` message: the block composes with the chat template).

From Python: :func:`run_village` returns a :class:`~tokendance_sgl.programs.common.ProgramResult` (transcript,
per-round ``cached_tokens``, blocks).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
import sglang as sgl

from tokendance_sgl.lang import gather
from tokendance_sgl.programs.common import (
    ProgramResult,
    cli,
    make_backend,
    program_output,
    round_meta,
    run_program,
    short_meta,
)
from tokendance_sgl.workload_text import (
    GA_CONCERNS,
    GA_EVENTS,
    GA_EXTRA_FIRST,
    GA_EXTRA_HOMES,
    GA_EXTRA_JOBS,
    GA_EXTRA_LAST,
    GA_HABITS,
    GA_PEOPLE,
    GA_TRAITS,
    VILLAGE,
)

HOURS = ["7:00", "8:00", "9:00", "10:00", "11:00", "12:00", "13:00", "14:00", "15:00", "16:00", "17:00", "18:00",
         "19:00", "20:00", "21:00", "22:00"]

RULES = (
    f"You live in the village of {VILLAGE}. Every hour you plan your next hour and then act. Answer as yourself, "
    "in the first person, in one short sentence."
)


@dataclass(frozen=True)
class Villager:
    name: str
    age: int
    occupation: str
    home: str
    traits: tuple
    habit: str
    concern: str

    def persona(self) -> str:
        return (f"{RULES}\nYou are {self.name}, {self.age}, {self.occupation}. You live in {self.home}. You are "
                f"{self.traits[0]} and {self.traits[1]}; you {self.habit}. Lately you worry about {self.concern}.")


def villagers(n: int, seed: int = 0) -> list:
    """``n`` seeded villagers (the first 16 from the workload's cast, then generated ones)."""
    rng = random.Random(f"village/{seed}")
    out = []
    for i in range(n):
        if i < len(GA_PEOPLE):
            name, age, job, home, _ = GA_PEOPLE[i]
        else:
            name = f"{GA_EXTRA_FIRST[i % len(GA_EXTRA_FIRST)]} {GA_EXTRA_LAST[(i * 7) % len(GA_EXTRA_LAST)]}"
            age, job, home = 20 + (i * 13) % 55, rng.choice(GA_EXTRA_JOBS), rng.choice(GA_EXTRA_HOMES)
        out.append(Villager(name, age, job, home, tuple(rng.sample(GA_TRAITS, 2)), rng.choice(GA_HABITS),
                            rng.choice(GA_CONCERNS)))
    return out


@sgl.function
def village_program(s, people, rounds, max_tokens, event):
    names = [p.name for p in people]
    folk = s.fork(len(people))
    folk += lambda i: sgl.system(people[i].persona())
    folk += sgl.user_begin() + f"It is {HOURS[0]}. {event}\n"
    transcript, per_round, blocks = [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        folk += "Plan your next hour." + sgl.user_end() + sgl.assistant(
            sgl.gen("plan", max_tokens=max_tokens, stop="\n"))
        folk += sgl.user("What do you do or say now?") + sgl.assistant(
            sgl.gen("act", max_tokens=max_tokens, stop="\n"))
        last = r == rounds - 1
        if not last:  # the next message opens with the hour; the block goes inside it
            folk += sgl.user_begin() + f"It is {HOURS[(r + 1) % len(HOURS)]}.\n"
        block = gather(folk, var="act", names=names, header="What everyone did in the last hour:\n",
                       append=not last)
        latency = time.perf_counter() - t0
        rows = [{"round": r, "agent": i, "name": names[i], "plan": f["plan"], "act": f["act"],
                 "meta": {"plan": short_meta(f.get_meta_info("plan")), "act": short_meta(f.get_meta_info("act"))}}
                for i, f in enumerate(folk)]
        transcript += rows
        per_round.append(round_meta(r, latency, rows, list(folk)))
        blocks.append(str(block))
    return program_output(s, list(folk), names, transcript, per_round, blocks)


def run_village(
    url_or_backend: Any,
    *,
    agents: int = 4,
    rounds: int = 3,
    max_new_tokens: int = 24,
    seed: int = 0,
    temperature: float = 0.0,
    plain: bool = False,
    event: Optional[str] = None,
) -> ProgramResult:
    """Runs the village against a server URL (or a backend object); returns transcript and per-round meta."""
    backend = make_backend(url_or_backend, plain=plain)
    people = villagers(agents, seed)
    event = event or GA_EVENTS[seed % len(GA_EVENTS)]
    return run_program(
        "village", village_program, backend, n_agents=agents, n_rounds=rounds,
        settings={"max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature, "event": event},
        people=people, rounds=rounds, max_tokens=max_new_tokens, event=event, temperature=temperature,
    )


def main(argv: Optional[list] = None) -> int:
    return cli("GenerativeAgents-like village (fork + gather) against a running SGLang server.", run_village,
               agents=4, rounds=3, max_new_tokens=24, vars_=("plan", "act"), argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
