"""An AgentSociety-like city social feed as an SGLang program: many residents post short messages; every round each
one reads the feed of the last round's posts, reacts and posts again.

    python -m tokendance_sgl.programs.feed --url http://127.0.0.1:30000 --agents 8 --rounds 3

Each resident is a fork of one state (a shared system message about the feed) with a private profile.  Round 0 is a
first post about the day's news; in round ``r >= 1``::

    feed = gather(residents, var="post", names=handles, item="@{name}: {output}\\n", append=False)
    user:      <feed> How do you react to your feed?
    assistant: select("reaction", ["agree", "disagree", "laugh", "ignore"])
    user:      Write your next post.
    assistant: gen("post")

``append=False`` returns the block without appending it; the program puts it into its own message
(``sgl.user(feed + ...)``) and the TokenDanceEndpoint still sends its exact ids and segment spans.  ``--no-react``
drops the ``select`` step.

From Python: :func:`run_feed` returns a :class:`~tokendance_sgl.programs.common.ProgramResult`.
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
from tokendance_sgl.workload_text import AS_DISTRICTS, AS_FIRST, AS_INTERESTS, AS_JOBS, AS_NEWS, AS_STANCES, AS_SUFFIX

REACTIONS = ["agree", "disagree", "laugh", "ignore"]

FEED_RULES = (
    "You are a resident of Northbridge posting on Chirp, the city's social feed. Posts are one short sentence in "
    "your own voice, under 20 words, without hashtags."
)


@dataclass(frozen=True)
class Resident:
    handle: str
    job: str
    district: str
    interest: str
    stance: str

    def profile(self) -> str:
        return (f"You are @{self.handle}, a {self.job} from {self.district} who is into {self.interest} and "
                f"{self.stance}.")


def residents(n: int, seed: int = 0) -> list:
    """``n`` seeded residents with distinct handles."""
    rng = random.Random(f"feed/{seed}")
    out, used = [], set()
    for i in range(n):
        handle = f"{AS_FIRST[i % len(AS_FIRST)]}{AS_SUFFIX[(i * 5 + seed) % len(AS_SUFFIX)]}"
        while handle in used:
            handle += str(i)
        used.add(handle)
        out.append(Resident(handle, rng.choice(AS_JOBS), rng.choice(AS_DISTRICTS), rng.choice(AS_INTERESTS),
                            rng.choice(AS_STANCES)))
    return out


@sgl.function
def feed_program(s, people, rounds, max_tokens, news, react, reactions):
    handles = [p.handle for p in people]
    s += sgl.system(FEED_RULES)
    crowd = s.fork(len(people))
    transcript, per_round, blocks = [], [], []
    feed = None
    for r in range(rounds):
        t0 = time.perf_counter()
        if r == 0:
            crowd += lambda i: sgl.user(f"{people[i].profile()}\nToday's news: {news}\nWrite your first post.")
        else:
            if react:
                crowd += sgl.user(feed + "How do you react to your feed?") + sgl.assistant(
                    sgl.select("reaction", reactions))
                crowd += sgl.user("Write your next post.")
            else:
                crowd += sgl.user(feed + "Write your next post.")
        crowd += sgl.assistant(sgl.gen("post", max_tokens=max_tokens, stop="\n"))
        feed = gather(crowd, var="post", names=handles, item="@{name}: {output}\n", header="Your feed:\n",
                      append=False)
        latency = time.perf_counter() - t0
        rows = []
        for i, c in enumerate(crowd):
            row = {"round": r, "agent": i, "name": handles[i], "post": c["post"],
                   "meta": {"post": short_meta(c.get_meta_info("post"))}}
            if r > 0 and react:
                row["reaction"] = c["reaction"]
            rows.append(row)
        transcript += rows
        per_round.append(round_meta(r, latency, rows, list(crowd)))
        blocks.append(str(feed))
    return program_output(s, list(crowd), handles, transcript, per_round, blocks)


def run_feed(
    url_or_backend: Any,
    *,
    agents: int = 8,
    rounds: int = 3,
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 0.0,
    plain: bool = False,
    react: bool = True,
    reactions: Optional[list] = None,
    news: Optional[str] = None,
) -> ProgramResult:
    """Runs the feed against a server URL (or a backend object); returns transcript and per-round meta."""
    backend = make_backend(url_or_backend, plain=plain)
    people = residents(agents, seed)
    news = news or AS_NEWS[seed % len(AS_NEWS)]
    reactions = list(reactions or REACTIONS)
    return run_program(
        "feed", feed_program, backend, n_agents=agents, n_rounds=rounds,
        settings={"max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature, "news": news,
                  "react": react, "reactions": reactions if react else []},
        people=people, rounds=rounds, max_tokens=max_new_tokens, news=news, react=react, reactions=reactions,
        temperature=temperature,
    )


def main(argv: Optional[list] = None) -> int:
    def extra(p):
        p.add_argument("--no-react", action="store_true", help="skip the select (reaction) step")
        return lambda a: {"react": not a.no_react}

    return cli("AgentSociety-like social feed (fork + gather) against a running SGLang server.", run_feed,
               agents=8, rounds=3, max_new_tokens=20, vars_=("reaction", "post"), argv=argv, extra=extra)


if __name__ == "__main__":
    raise SystemExit(main())
