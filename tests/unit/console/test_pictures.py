"""The lineage picture's layout and the metric panels (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.console.pictures import LANE_Y, STEP_X, lineage_picture, metric_panels
from pipeline.domain.revisions import AliasMove, Revision

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rev(i: int, parent: int | None, status: str = "retired") -> Revision:
    rid = f"01J{i:023d}"
    return Revision(
        revision_id=rid,
        user_id="u",
        parent_id=None if parent is None else f"01J{parent:023d}",
        status=status,
        artifact_uri="s3://b/k",
        sha256="0" * 64,
        size_bytes=1,
        manifest={"metrics": {"holdout_nll": 1.0 + i}},
        created_at=T0 + timedelta(minutes=i),
        status_at=T0,
    )


def test_a_chain_stays_on_one_lane_and_a_branch_takes_a_new_one():
    revs = [rev(0, None), rev(1, 0, "promoted"), rev(2, 1, "rejected"), rev(3, 0, "candidate")]
    pic = lineage_picture(revs, revs[1].revision_id, [])
    ys = [n.y for n in pic.nodes]
    assert ys[0] == ys[1] == ys[2] and ys[3] == ys[0] + LANE_Y  # r3 is r0's second child
    assert [n.x for n in pic.nodes] == sorted(n.x for n in pic.nodes) and pic.nodes[1].x - pic.nodes[0].x == STEP_X
    assert [(e.x1, e.x2) for e in pic.edges] == [
        (pic.nodes[0].x, pic.nodes[1].x),
        (pic.nodes[1].x, pic.nodes[2].x),
        (pic.nodes[0].x, pic.nodes[3].x),
    ]
    assert [n.serving for n in pic.nodes] == [False, True, False, False]
    assert pic.height >= ys[3] + LANE_Y // 2


def test_alias_moves_are_numbered_marks_on_the_revisions_they_moved_to():
    revs = [rev(0, None), rev(1, 0)]
    a, b = revs[0].revision_id, revs[1].revision_id
    history = [
        AliasMove("u", "production", None, a, "gate", "gate", T0),
        AliasMove("u", "production", a, b, "gate", "gate", T0),
        AliasMove("u", "production", b, a, "rollback", "console:operator/key:k", T0),
    ]
    pic = lineage_picture(revs, a, history)
    assert [m.n for m in pic.nodes[0].marks] == [1, 3] and [m.n for m in pic.nodes[1].marks] == [2]
    assert "rollback, by console:operator/key:k" in pic.nodes[0].marks[1].title
    assert pic.nodes[0].marks[0].dx != pic.nodes[0].marks[1].dx  # side by side, not on top of each other


def test_a_parent_outside_the_list_starts_a_root():
    pic = lineage_picture([rev(5, 4)], None, [])
    assert pic.edges == [] and len(pic.nodes) == 1


def test_metric_panels_scale_each_metric_and_skip_missing_values():
    judged = [
        ("r1", "promoted", {"candidate": {"holdout_nll": 2.0, "drift_kl": None}}),
        ("r2", "rejected", {"candidate": {"holdout_nll": 3.0, "drift_kl": float("nan")}}),
        ("r3", "promoted", {"candidate": {"holdout_nll": 1.0, "preference_accuracy": True}}),
    ]
    nll, drift, acc = metric_panels(judged)
    assert (nll.lo, nll.hi) == (1.0, 3.0) and len(nll.points) == 3
    top, bottom = min(p.y for p in nll.points), max(p.y for p in nll.points)
    assert nll.points[1].y == top and nll.points[2].y == bottom  # 3.0 highest, 1.0 lowest
    assert nll.points[1].outcome == "rejected" and "r2: holdout_nll 3" in nll.points[1].title
    assert drift.points == [] and acc.points == []  # NaN and booleans are not measurements


def test_an_edge_to_another_lane_leaves_its_parent_downwards():
    revs = [rev(0, None), rev(1, 0), rev(2, 0)]
    pic = lineage_picture(revs, None, [])
    straight, branch = pic.edges
    assert straight.d == f"M{straight.x1},{straight.y1} L{straight.x2},{straight.y2}"
    # the first control point is already on the child's lane, half a step to the right of the parent
    assert branch.d.split(" C")[1].split(" ")[0] == f"{branch.x1 + STEP_X // 2},{branch.y2}"
