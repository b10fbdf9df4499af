"""Moving a user's production alias, and forgetting a user: every path that changes what serves a user.

Order of a promotion (the gate's, an operator's promote or rollback), each step idempotent:

1. the alias moves by compare-and-swap from the expected revision (`storage.registry.move_alias`: the history row
   and the revision statuses in the same transaction); a concurrent move makes it a Conflict and changes nothing;
2. the pointer ``users/{user}/production.json`` is rewritten from the alias (`publish`);
3. the move is announced on persona.promotions.v1 (promotion.v1), so every serving worker hears it.

A step that fails after 1 is repaired by running the same promotion again: the alias already points there, the
pointer is republished and the announcement repeated. The gate does step 1 inside its decision's transaction and
then calls `announce_serving` for 2 and 3.

Order of a forget: the user's rows in one transaction, then every object under ``users/{user}/``, then forget.v1
on the promotions topic (serving workers drop every cached copy of the deleted artifacts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC
from typing import Final

from pipeline.domain.errors import Conflict, InvalidInput, NotFound
from pipeline.domain.revisions import AliasMove, check_revision_id, rollback_target
from pipeline.observability import metrics
from pipeline.serving.promotions import AnnounceError, Announcer
from pipeline.storage import registry
from pipeline.storage.stores import Stores

log = logging.getLogger(__name__)


class Current:
    """``expected`` of `promote` by default: whatever the alias points at when it is read."""

    def __repr__(self) -> str:
        return "CURRENT"


#: Promote from whatever the alias points at when it is read (no compare-and-swap expectation of the caller's).
CURRENT: Final = Current()


@dataclass(frozen=True)
class Promotion:
    """What a promote or rollback did: the alias move (None when the alias already pointed there) and whether the
    serving workers were told (``warning`` says why not)."""

    user_id: str
    revision_id: str
    move: AliasMove | None
    announced: bool
    warning: str | None = None


@dataclass(frozen=True)
class ForgetReport:
    """What `forget` removed (all empty when there was nothing left) and whether serving workers were told."""

    user_id: str
    rows: dict[str, int]
    objects: list[str]
    sha256s: list[str] = field(default_factory=list)  # the artifacts of the deleted revisions (cache keys)
    announced: bool = False
    warning: str | None = None

    @property
    def nothing(self) -> bool:
        return not self.objects and not any(self.rows.values())


def promote(
    stores: Stores,
    announcer: Announcer,
    user_id: str,
    revision_id: str,
    *,
    expected: str | Current | None = CURRENT,
    reason: str = "promote",
    actor: str = "operator",
    allow_rejected: bool = False,
) -> Promotion:
    """Make ``revision_id`` the user's production revision (module docstring, steps 1-3).

    ``expected`` is the revision the alias must point at now (None: no production yet); by default the value read
    now. Raises NotFound for an unknown revision or a missing artifact, InvalidInput for another user's or a
    rejected revision (unless ``allow_rejected``), Conflict when the alias is not at ``expected``.
    """
    with stores.db.connection() as conn:
        rev = registry.get_revision(conn, revision_id)
        if rev.user_id != user_id:
            raise InvalidInput(f"revision {rev.revision_id} belongs to {rev.user_id!r}, not {user_id!r}")
        if rev.status == "rejected" and not allow_rejected:
            raise InvalidInput(f"revision {rev.revision_id} was rejected by the gate; it is not promoted")
        if not stores.objects.exists(registry.key_of(rev.artifact_uri)):
            raise NotFound(f"the artifact of {rev.revision_id} is missing from the object store; not promoted")
        current = registry.production(conn, user_id)
        current_id = current.revision_id if current else None
        exp = current_id if isinstance(expected, Current) else expected
        move = None
        if not (exp == current_id == rev.revision_id):
            with conn.transaction():
                move = registry.move_alias(conn, user_id, rev.revision_id, expected=exp, reason=reason, actor=actor)
    announced, warning = announce_serving(stores, announcer, user_id, reason)
    return Promotion(user_id, rev.revision_id, move, announced, warning)


def rollback(
    stores: Stores, announcer: Announcer, user_id: str, *, to: str | None = None, actor: str = "operator"
) -> Promotion:
    """Move production back to ``to`` or, by default, to the revision that served before the current one."""
    with stores.db.connection() as conn:
        current = registry.production(conn, user_id)
        if current is None:
            raise InvalidInput(f"{user_id!r} has no production revision; there is nothing to roll back")
        history = registry.alias_history(conn, user_id)
    target = check_revision_id(to) if to else rollback_target(history, current.revision_id)
    if target is None:
        raise InvalidInput(f"{current.revision_id} is the first revision that served {user_id!r}; name one with --to")
    if target == current.revision_id:
        raise InvalidInput(f"{target} is already production for {user_id!r}")
    done = promote(stores, announcer, user_id, target, expected=current.revision_id, reason="rollback", actor=actor)
    if done.move is None:  # pragma: no cover - excluded above
        raise Conflict("rollback found the alias already at its target")
    return done


def publish(stores: Stores, user_id: str) -> None:
    """(Re)write users/{user}/production.json from the alias; delete it when the user has no production."""
    with stores.db.connection() as conn:
        rev = registry.production(conn, user_id)
        at = registry.alias_updated_at(conn, user_id)
    if rev is None or at is None:
        stores.objects.delete_pointer(user_id)
        return
    stores.objects.publish_pointer(
        user_id, rev.revision_id, rev.sha256, rev.artifact_uri, at.astimezone(UTC).isoformat()
    )


def announce_serving(
    stores: Stores,
    announcer: Announcer,
    user_id: str,
    reason: str,
    *,
    only: str | None = None,
    strict: bool = False,
) -> tuple[bool, str | None]:
    """Steps 2 and 3 for what serves ``user_id`` now: publish the pointer, then announce it. Returns (announced,
    why not). Nothing is announced for a user without production, nor, with ``only``, when another revision than
    ``only`` serves (a later move announced itself). A broker failure is reported, not raised (the alias and the
    pointer have moved; running the promotion again re-announces), unless ``strict``: then AnnounceError is raised
    for the caller to retry (the gate's task does)."""
    with stores.db.connection() as conn:
        rev = registry.production(conn, user_id)
    if only is not None and (rev is None or rev.revision_id != only):
        return False, f"{only} does not serve {user_id!r} any more; nothing to announce"
    publish(stores, user_id)
    if rev is None:
        return False, f"{user_id!r} has no production revision; nothing to announce"
    try:
        announcer.promotion(rev, reason=reason)
    except AnnounceError as e:
        if strict:
            raise
        log.warning("%s: %s", user_id, e)
        return False, f"{e}; run the command again to re-announce"
    metrics.PROMOTIONS.labels(reason).inc()
    return True, None


def forget(stores: Stores, announcer: Announcer, user_id: str) -> ForgetReport:
    """Remove everything persona holds of ``user_id``: events, buffer, revisions, alias and history, decisions,
    identity, and every object under users/{user_id}/ (revisions and the pointer); then tell the serving workers.
    Running it again removes nothing and announces nothing."""
    with stores.db.connection() as conn, conn.transaction():
        rows, shas = registry.delete_user(conn, user_id)
    objects = stores.objects.delete_user(user_id)
    report = ForgetReport(user_id, rows, objects, shas)
    if report.nothing:
        return report
    try:  # the serving workers drop their cached copies (host, device slots and disk)
        announcer.forget(user_id, shas)
    except AnnounceError as e:
        warning = (
            f"{e}; serving workers may keep cached copies of {', '.join(s[:12] for s in shas)} until they evict "
            "them or restart (their disk tier: PERSONA_SERVE_CACHE_DIR/<sha256>)"
        )
        return ForgetReport(user_id, rows, objects, shas, announced=False, warning=warning)
    return ForgetReport(user_id, rows, objects, shas, announced=True)
