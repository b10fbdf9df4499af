"""What `persona demo` follows per user (`UserRun`) and the tables it ends with: what happened to the input, one
row per user, and the side-by-side answers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rich.table import Table


@dataclass
class UserRun:
    """What happened to one simulated user in this run."""

    user_id: str
    register: str
    sent: int = 0
    first_event_at: float | None = None  # monotonic
    known_revisions: frozenset[str] = frozenset()
    state: str = "sending"
    revision_id: str | None = None
    chain: list[str] = field(default_factory=list)
    outcome: str | None = None
    reason: str = ""
    nll_base: float | None = None
    nll_current: float | None = None  # the revision serving when the candidate was judged (None: first one)
    nll_candidate: float | None = None
    train_events: int = 0
    holdout_events: int = 0
    served_revision: str | None = None
    seconds_to_serving: float | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None and (self.outcome != "promoted" or self.served_revision == self.revision_id)


def _nll(p: UserRun) -> str:
    """base -> candidate (change), with the revision serving at judgement in between when there was one."""
    if p.nll_base is None or p.nll_candidate is None:
        return "-"
    ref = p.nll_current if p.nll_current is not None else p.nll_base
    change = (p.nll_candidate - ref) / ref * 100 if ref else 0.0
    middle = f" -> {p.nll_current:.3f}" if p.nll_current is not None else ""
    return f"{p.nll_base:.3f}{middle} -> {p.nll_candidate:.3f} ({change:+.0f}%)"


def _chain(p: UserRun) -> str:
    """The user's revisions, oldest first, by their last 8 characters; the one of this run is bold."""
    parts = [f"[bold]{r[-8:]}[/bold]" if r == p.revision_id else r[-8:] for r in p.chain]
    return " -> ".join(["none", *parts]) if parts else "-"


def _decision(p: UserRun) -> str:
    if p.outcome is None:
        return p.state
    return p.reason if p.reason.startswith(p.outcome) else f"{p.outcome}: {p.reason}"


def users_table(people: list[UserRun]) -> Table:
    table = Table(title="per user: events -> revision -> gate -> serving", show_lines=False)
    table.add_column("user")
    table.add_column("style")
    table.add_column("events\n(train/holdout)", justify="right")
    table.add_column("revision chain")
    table.add_column("gate decision")
    table.add_column("holdout NLL/token base\n(-> serving) -> candidate")
    table.add_column("first event ->\nserving (s)", justify="right")
    for p in people:
        table.add_row(
            p.user_id,
            p.register,
            f"{p.sent} ({p.train_events}/{p.holdout_events})",
            _chain(p),
            _decision(p),
            _nll(p),
            f"{p.seconds_to_serving:.0f}" if p.seconds_to_serving is not None else "-",
        )
    return table


def input_table(dead: list[list[str]]) -> Table:
    table = Table(title="records written straight to Kafka, past the API")
    table.add_column("path")
    table.add_column("count", justify="right")
    table.add_column("reasons (field: code)")
    codes = Counter(c for reasons in dead for c in reasons)
    table.add_row("dead-lettered by the buffer consumer", str(len(dead)), ", ".join(sorted(codes)))
    return table


def answers_table(answers: list[tuple[str, str, str]]) -> Table:
    table = Table(title="the same prompt, greedy decoding, one serving worker", show_lines=True)
    table.add_column("model")
    table.add_column("x-persona-revision")
    table.add_column("answer")
    for model, revision, text in answers:
        table.add_row(model, revision, text.strip())
    return table
