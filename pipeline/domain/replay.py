"""Replaying stored gate decisions under other rules: which would flip (passed <-> rejected), and which rules changed.
Pure (no I/O): `persona gate replay` reads the decisions and prints the flips; nothing is written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.domain.gating import Decision, RuleSet, decide


class PastDecision(NamedTuple):
    """A stored decision to replay: a plain 5-tuple (id, metrics, user_id, app, passed) works too."""

    id: Any
    metrics: Mapping[str, Any]
    user_id: str | None
    app: str | None
    passed: bool
    decision: Decision | None = None  # the stored decision, when known: flips then say which rules changed


@dataclass(frozen=True)
class Flip:
    """A stored decision that ``ruleset`` would turn the other way."""

    id: Any
    was_passed: bool
    now_passed: bool
    decision: Decision  # under the new rules
    changed: tuple[str, ...] = ()  # "rule: old -> new" outcomes, when the old decision was given

    @property
    def summary(self) -> str:
        """One line: ``ID: rejected -> passed: <new reason> [changed: ...]``."""
        word = {True: "passed", False: "rejected"}
        line = f"{self.id}: {word[self.was_passed]} -> {word[self.now_passed]}: {self.decision.reason}"
        if self.changed:
            line += f" [changed: {'; '.join(self.changed)}]"
        return line


def _changes(old: Decision, new: Decision) -> tuple[str, ...]:
    before = {r.name: r.outcome for r in old.results}
    after = {r.name: r.outcome for r in new.results}
    out = [
        f"{n}: {before.get(n, 'absent')} -> {after.get(n, 'absent')}"
        for n in [*before, *(n for n in after if n not in before)]
        if before.get(n) != after.get(n)
    ]
    return tuple(out)


def flips(decisions: Iterable[PastDecision | tuple[Any, ...]], ruleset: RuleSet) -> list[Flip]:
    """Which stored decisions ``ruleset`` would flip (passed <-> rejected), in input order, and why."""
    out = []
    for item in decisions:
        past = item if isinstance(item, PastDecision) else PastDecision(*item)
        new = decide(ruleset, past.metrics, user_id=past.user_id, app=past.app)
        if new.passed != bool(past.passed):
            changed = _changes(past.decision, new) if past.decision is not None else ()
            out.append(Flip(past.id, bool(past.passed), new.passed, new, changed))
    return out
