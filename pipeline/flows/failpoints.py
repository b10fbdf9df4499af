"""Failpoints: named moments of a flow where a test can make something happen (a forget, a crash) at the worst
time. In production nothing is armed and `fire` is a dictionary lookup that does nothing.

A test arms a point for a block::

    with failpoints.armed(failpoints.BEFORE_CANDIDATE_COMMIT, lambda **ctx: forget(ctx["user_id"])):
        retrain(...)

Each point is fired at exactly one place, with keyword context (``user_id``, ``revision_id``):

- `BEFORE_CANDIDATE_COMMIT` (pipeline.flows.retrain): training ended and the candidate's objects are uploaded
  and verified; the transaction that writes its row has not begun.
- `BEFORE_DECISION` (pipeline.flows.gate): the candidate's metrics are measured; the transaction that writes the
  decision (and moves the alias) has not begun.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

BEFORE_CANDIDATE_COMMIT = "retrain.before_candidate_commit"
BEFORE_DECISION = "gate.before_decision"
POINTS = frozenset({BEFORE_CANDIDATE_COMMIT, BEFORE_DECISION})

_armed: dict[str, Callable[..., Any]] = {}


def fire(name: str, **context: Any) -> None:
    """Run the callback armed at ``name``, if any, with ``context`` (whatever it raises propagates)."""
    callback = _armed.get(name)
    if callback is not None:
        callback(**context)


@contextlib.contextmanager
def armed(name: str, callback: Callable[..., Any]) -> Iterator[None]:
    """Arm ``name`` with ``callback`` for the block (one callback per point; the previous one is restored)."""
    if name not in POINTS:
        raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(sorted(POINTS))}")
    previous = _armed.get(name)
    _armed[name] = callback
    try:
        yield
    finally:
        if previous is None:
            _armed.pop(name, None)
        else:
            _armed[name] = previous
