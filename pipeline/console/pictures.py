"""The pictures of a user's page, as coordinates for the SVG templates (pure: values in, values out).

`lineage_picture`: revisions left to right in the order they were written, one lane per branch (a revision continues
its parent's lane when it is the parent's first child), parent edges, the status of each node, the one production
serves, and the alias history as numbered marks on the revisions it moved to. `metric_panels`: one small chart per
metric over the revisions that were judged (each with its own scale, since NLL, KL and accuracy differ in range).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.domain.revisions import AliasMove, Revision

STEP_X = 64
LANE_Y = 56
PAD_X = 36
PAD_TOP = 46
NODE_R = 10


@dataclass(frozen=True)
class Mark:
    n: int  # 1-based position in the alias history
    dx: int
    title: str


@dataclass(frozen=True)
class Node:
    revision_id: str
    short: str
    status: str
    serving: bool
    x: int
    y: int
    title: str
    marks: list[Mark] = field(default_factory=list)


@dataclass(frozen=True)
class Edge:
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def d(self) -> str:
        """The SVG path: straight along a lane; to another lane, a curve that leaves its parent downwards at once
        (so it never runs under the parent's next child on the parent's lane)."""
        if self.y1 == self.y2:
            return f"M{self.x1},{self.y1} L{self.x2},{self.y2}"
        half = STEP_X // 2
        return f"M{self.x1},{self.y1} C{self.x1 + half},{self.y2} {self.x2 - half},{self.y2} {self.x2},{self.y2}"


@dataclass(frozen=True)
class Lineage:
    width: int
    height: int
    nodes: list[Node]
    edges: list[Edge]


def lineage_picture(revisions: Sequence[Revision], production: str | None, history: Sequence[AliasMove]) -> Lineage:
    """Coordinates of the lineage tree of one user's ``revisions`` (oldest first)."""
    lane: dict[str, int] = {}
    first_child_taken: set[str] = set()
    lanes = 0
    pos: dict[str, tuple[int, int]] = {}
    ids = {r.revision_id for r in revisions}
    marks: dict[str, list[Mark]] = {}
    for i, move in enumerate(history, start=1):
        at = move.at.strftime("%Y-%m-%d %H:%M:%S")
        title = f"#{i} {at} {move.from_revision or 'none'} -> {move.to_revision} ({move.reason}, by {move.actor})"
        got = marks.setdefault(move.to_revision, [])
        got.append(Mark(i, 0, title))
    nodes: list[Node] = []
    edges: list[Edge] = []
    for i, r in enumerate(revisions):
        parent = r.parent_id if r.parent_id in ids else None
        if parent is not None and parent not in first_child_taken:
            first_child_taken.add(parent)
            lane[r.revision_id] = lane[parent]
        else:
            lane[r.revision_id] = lanes
            lanes += 1
        x, y = PAD_X + i * STEP_X, PAD_TOP + lane[r.revision_id] * LANE_Y
        pos[r.revision_id] = (x, y)
        if parent is not None:
            px, py = pos[parent]
            edges.append(Edge(px, py, x, y))
        rm = marks.get(r.revision_id, [])
        placed = [Mark(m.n, int((k - (len(rm) - 1) / 2) * 18), m.title) for k, m in enumerate(rm)]
        nll = (r.manifest.get("metrics") or {}).get("holdout_nll")
        extra = f", holdout_nll {nll:.4g}" if isinstance(nll, int | float) else ""
        title = f"{r.revision_id} [{r.status}] {r.created_at.strftime('%Y-%m-%d %H:%M:%S')}{extra}"
        nodes.append(
            Node(r.revision_id, r.revision_id[-6:], r.status, r.revision_id == production, x, y, title, placed)
        )
    width = PAD_X * 2 + max(len(revisions) - 1, 0) * STEP_X + 40
    height = PAD_TOP + max(lanes, 1) * LANE_Y
    return Lineage(width, height, nodes, edges)


#: The metrics charted over the judged revisions: (key in the decision's candidate metrics, label, better).
CHARTED: tuple[tuple[str, str, str], ...] = (
    ("holdout_nll", "holdout NLL (candidate)", "lower is better"),
    ("drift_kl", "drift KL from the base", "lower is closer to the base"),
    ("preference_accuracy", "preference accuracy", "higher is better"),
)

PANEL_W = 300
PANEL_H = 120
PANEL_PAD = 26


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str
    outcome: str


@dataclass(frozen=True)
class Panel:
    key: str
    label: str
    better: str
    points: list[Point]
    lo: float | None
    hi: float | None

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
        return None
    return float(x)


def metric_panels(judged: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[Panel]:
    """One panel per charted metric over ``judged``: (revision_id, outcome, decision metrics) in revision order."""
    panels = []
    n = len(judged)
    for key, label, better in CHARTED:
        values = [(rid, outcome, _number((m.get("candidate") or {}).get(key))) for rid, outcome, m in judged]
        have = [v for _, _, v in values if v is not None]
        if not have:
            panels.append(Panel(key, label, better, [], None, None))
            continue
        lo, hi = min(have), max(have)
        span = (hi - lo) or (abs(hi) or 1.0)
        points = []
        for i, (rid, outcome, v) in enumerate(values):
            if v is None:
                continue
            x = PANEL_PAD + (i * (PANEL_W - 2 * PANEL_PAD) / (n - 1) if n > 1 else (PANEL_W - 2 * PANEL_PAD) / 2)
            y = PANEL_H - PANEL_PAD / 2 - (v - lo) / span * (PANEL_H - 1.5 * PANEL_PAD)
            points.append(Point(x, y, f"{rid}: {key} {v:.4g} ({outcome})", outcome))
        panels.append(Panel(key, label, better, points, lo, hi))
    return panels
