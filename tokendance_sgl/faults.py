"""Fault injection for tests (``TOKENDANCE_TEST_FAULTS``), in the manner of SGLang's ``SGLANG_TEST_*`` switches.

``TOKENDANCE_TEST_FAULTS="copy@1,compose@2,prepass@3"`` makes a step of segment reuse raise
:class:`InjectedFault` every time it runs while the collective tree's current round is the one named:

* ``copy`` -- the batched copy + re-rotation kernel that makes master copies;
* ``compose`` -- right after a request's row was composed, before SGLang takes it;
* ``prepass`` -- the pre-pass forward (selective recompute of the composed region).

Each failure must roll back (the request is then computed as plain prefill) and be counted in the ``rollbacks``
counter of ``/tokendance/stats``. Unset (the default), nothing is injected and :meth:`Faults.check` is one lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ENV_FAULTS", "SITES", "Faults", "InjectedFault"]

ENV_FAULTS = "TOKENDANCE_TEST_FAULTS"
SITES = ("copy", "compose", "prepass")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Faults:
    rounds: dict = field(default_factory=dict)  # site -> rounds in which it fails

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        rounds: dict = {}
        for item in filter(None, (s.strip() for s in (spec or "").split(","))):
            site, at, rnd = item.partition("@")
            if site not in SITES or not at or not rnd.strip().isdigit():
                raise ValueError(f"{ENV_FAULTS}: {item!r} is not SITE@ROUND with SITE one of {', '.join(SITES)}")
            rounds.setdefault(site, set()).add(int(rnd))
        return cls({k: frozenset(v) for k, v in rounds.items()})

    def check(self, site: str, current_round: int) -> None:
        if self.rounds and current_round in self.rounds.get(site, ()):
            raise InjectedFault(f"injected {site} failure in round {current_round} ({ENV_FAULTS})")
