"""Moving a user's production alias, and forgetting a user: every path that changes what serves a user.

Order of a promotion (the gate's, an operator's promote or rollback), each step idempotent:

1. the alias moves by compare-and-swap from the expected revision (`storage.registry.move_alias`: the history row
   and the revision statuses in the same transaction); a concurrent move makes it a Conflict and changes nothing;
2. the pointer ``users/{user}/production.json`` is rewritten from the alias (`publish`);
3. the move is announced on persona.promotions.v1 (promotion.v1), so every serving worker hears it.

A step that fails after 1 is repaired by running the same promotion again: the alias already points there, the
pointer is republished and the announcement repeated. The gate does step 1 inside its decision's transaction and
then calls `announce_serving` for 2 and 3. Step 1 locks the user (`pipeline.storage.tenancy.lock_alive`): a user
forgotten since the revision was written is NotFound; a pointer published as the user is forgotten is deleted again.

Order of a forget: the user's rows and its tombstone in one transaction (`storage.registry.delete_user`), then every
object under ``users/{user}/``, then forget.v1 on the promotions topic (serving workers drop every cached copy of the
deleted artifacts). Its report says what was removed and what persona could not remove (`Remainder`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pipeline.config import KafkaSettings
from pipeline.domain.errors import Conflict, Forgotten, InvalidInput, NotFound
from pipeline.domain.revisions import AliasMove, check_revision_id, rollback_target
from pipeline.observability import metrics
from pipeline.serving.promotions import AnnounceError, Announcer
from pipeline.storage import registry, tenancy
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
class Remainder:
    """Something of a forgotten user that persona could not remove: where it is, what it is, until when."""

    where: str
    what: str
    until: str


@dataclass(frozen=True)
class ForgetReport:
    """What `forget` removed (rows and objects; all empty when there was nothing left), the tombstone it wrote, and
    what it could not remove (``remaining``), including serving caches when the workers were not told."""

    user_id: str
    rows: dict[str, int]
    objects: list[str]
    sha256s: list[str] = field(default_factory=list)  # the artifacts of the deleted revisions (cache keys)
    announced: bool = False
    warning: str | None = None
    owner: str | None = None  # the application that owned the user; None when persona held no identity row
    forgotten_at: datetime | None = None  # the tombstone's time: events that occurred until then are dropped
    actor: str = "operator"
    remaining: list[Remainder] = field(default_factory=list)

    @property
    def nothing(self) -> bool:
        return not self.objects and not any(self.rows.values())

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (`persona forget --json`)."""
        out = asdict(self)
        out["forgotten_at"] = self.forgotten_at.isoformat() if self.forgotten_at else None
        out["nothing"] = self.nothing
        return out


def retention_text(ms: int) -> str:
    """A topic's retention.ms in words: ``7 days (retention.ms=604800000)``."""
    if ms < 0:
        return "no time limit (retention.ms=-1): until the records are deleted by hand"
    for unit, size in (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000), ("second", 1000)):
        if ms >= size and ms % size == 0:
            n = ms // size
            return f"{n} {unit}{'s' if n != 1 else ''} after each record was written (retention.ms={ms})"
    return f"{ms} ms after each record was written (retention.ms={ms})"


def remainders(
    kafka: KafkaSettings, *, versioning: str | None, objects_deleted: int, announced: bool, sha256s: list[str]
) -> list[Remainder]:
    """What a forget cannot remove: records in Kafka's topics (append-only logs, removed by retention only),
    noncurrent object versions when the bucket keeps versions, and serving caches the workers were not told of."""
    until = retention_text(kafka.retention_ms)
    out = [
        Remainder(
            f"kafka topic {kafka.topic_events}",
            "every event of this user sent before the forget (text included); those that occurred at or before the "
            "tombstone's time are dropped if they are read again",
            until,
        ),
        Remainder(
            f"kafka topic {kafka.topic_dlq}",
            "any event of this user that was rejected (its bytes and the reason)",
            until,
        ),
        Remainder(
            f"kafka topic {kafka.topic_promotions}",
            "promotion.v1 and forget.v1 records naming this user id (revision ids and sha256s, no weights or text)",
            until,
        ),
    ]
    if objects_deleted and versioning != "Off":
        out.append(
            Remainder(
                f"object store bucket (versioning {versioning or 'unknown: it could not be read'})",
                f"noncurrent versions of the {objects_deleted} deleted object(s) under users/<user>/, if the bucket "
                "keeps versions",
                "a lifecycle rule of the bucket expires noncurrent versions (persona sets none)",
            )
        )
    if sha256s and not announced:
        out.append(
            Remainder(
                "serving workers' caches (device slots, host memory, PERSONA_SERVE_CACHE_DIR/<sha256>)",
                f"cached copies of {', '.join(s[:12] for s in sha256s)}: forget.v1 was not announced",
                "each worker evicts them or restarts; run `persona forget` again to announce",
            )
        )
    return out


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
        registry.get_user(conn, user_id)  # NotFound for a forgotten or unknown user
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
                registry.lock_alive_revision(conn, user_id, rev.revision_id, since=rev.created_at)
                move = registry.move_alias(conn, user_id, rev.revision_id, expected=exp, reason=reason, actor=actor)
    announced, warning = announce_serving(stores, announcer, user_id, reason)
    return Promotion(user_id, rev.revision_id, move, announced, warning)


def rollback(
    stores: Stores, announcer: Announcer, user_id: str, *, to: str | None = None, actor: str = "operator"
) -> Promotion:
    """Move production back to ``to`` or, by default, to the revision that served before the current one."""
    with stores.db.connection() as conn:
        registry.get_user(conn, user_id)  # NotFound for a forgotten or unknown user
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
    # A forget that committed while the pointer was written did not see it: delete it again. (A forget that commits
    # after this read lists the user's objects after the pointer was written, and deletes it itself.)
    with stores.db.connection() as conn:
        gone = registry.production(conn, user_id) is None
    if gone:
        stores.objects.delete_pointer(user_id)
        metrics.FORGOTTEN_WRITES_DROPPED.labels("publish").inc()
        raise Forgotten(f"{user_id!r} was forgotten while its production pointer was published; it was deleted again")


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
    try:
        publish(stores, user_id)
    except Forgotten as e:
        log.warning("%s", e)
        return False, f"{e}; nothing announced"
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


def forget(
    stores: Stores,
    announcer: Announcer,
    user_id: str,
    *,
    actor: str = "operator",
    app: str | None = None,
    kafka: KafkaSettings | None = None,
) -> ForgetReport:
    """Remove everything persona holds of ``user_id``: events, buffer, revisions, alias and history, decisions,
    identity, and every object under users/{user_id}/ (revisions and the pointer); then tell the serving workers.

    The tombstone (sha256 of the id, owner, time, ``actor``) is written in the transaction of the deletes, also for
    an id persona does not hold: the operator was asked to forget it, so its late events are dropped. Work that began
    before (a training, a gate) writes nothing after it. With ``app`` (a caller acting for one application), another
    application's user is NotFound. Running it again removes nothing, announces nothing and moves the tombstone's
    time forward. ``kafka`` (default: the announcer's) names the topics and the retention in the report.
    """
    kafka = kafka or announcer.kafka
    with stores.db.connection() as conn, conn.transaction():
        deleted = registry.delete_user(conn, user_id, actor=actor, app=app)
    metrics.FORGETS.labels("held" if deleted.owner is not None else "unknown").inc()
    objects = stores.objects.delete_user(user_id)
    shas = deleted.sha256s
    announced, warning = False, None
    if shas or objects or any(deleted.rows.values()):
        try:  # the serving workers drop their cached copies (host, device slots and disk)
            announcer.forget(user_id, shas)
            announced = True
        except AnnounceError as e:
            warning = (
                f"{e}; serving workers may keep cached copies of {', '.join(s[:12] for s in shas) or 'nothing'} "
                "until they evict them or restart (their disk tier: PERSONA_SERVE_CACHE_DIR/<sha256>)"
            )
    remaining = remainders(
        kafka,
        versioning=stores.objects.versioning() if objects else None,
        objects_deleted=len(objects),
        announced=announced,
        sha256s=shas,
    )
    log.info(  # the id itself is not logged (logs outlive the forget): its sha256, as the tombstone keeps it
        "forgot user sha256 %s (owner %s) for %s: %d row(s), %d object(s), tombstone at %s",
        tenancy.user_sha256(user_id).hex()[:16],
        deleted.owner or "none",
        actor,
        sum(deleted.rows.values()),
        len(objects),
        deleted.forgotten_at.isoformat(),
    )
    return ForgetReport(
        user_id,
        deleted.rows,
        objects,
        shas,
        announced=announced,
        warning=warning,
        owner=deleted.owner,
        forgotten_at=deleted.forgotten_at,
        actor=actor,
        remaining=remaining,
    )
