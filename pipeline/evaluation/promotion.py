"""Announcing alias moves on Kafka (persona.promotions.v1, key = user_id): every serving worker hears them."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.config import KafkaSettings
from pipeline.domain.errors import Unavailable
from pipeline.domain.revisions import Revision

log = logging.getLogger(__name__)

_producers: dict[str, KafkaProducer] = {}
_lock = threading.Lock()


class AnnounceError(Unavailable):
    """The promotion event was not acknowledged by the broker."""

    code = "broker_unavailable"


def promotion_event(rev: Revision, *, reason: str, promoted_at: datetime | None = None) -> dict:
    """The promotion.v1 payload (schemas/events/promotion.v1.json)."""
    return {
        "schema": "promotion.v1",
        "user_id": rev.user_id,
        "revision_id": rev.revision_id,
        "parent_id": rev.parent_id,
        "sha256": rev.sha256,
        "uri": rev.artifact_uri,
        "promoted_at": (promoted_at or datetime.now(UTC)).astimezone(UTC).isoformat(),
        "reason": reason,
    }


def _producer(kafka: KafkaSettings) -> KafkaProducer:
    with _lock:
        if kafka.bootstrap_servers not in _producers:
            try:
                _producers[kafka.bootstrap_servers] = KafkaProducer(
                    bootstrap_servers=kafka.servers, acks="all", retries=5, client_id="persona-promotions"
                )
            except KafkaError as e:
                raise AnnounceError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {e!r}") from e
        return _producers[kafka.bootstrap_servers]


def announce(kafka: KafkaSettings, rev: Revision, *, reason: str, promoted_at: datetime | None = None) -> dict:
    """Produce the promotion event of ``rev`` and wait for the acknowledgement; returns the payload."""
    event = promotion_event(rev, reason=reason, promoted_at=promoted_at)
    try:
        _producer(kafka).send(kafka.topic_promotions, key=rev.user_id.encode(), value=orjson.dumps(event)).get(
            timeout=30
        )
    except KafkaError as e:
        raise AnnounceError(f"promotion of {rev.revision_id} for {rev.user_id!r} not announced: {e!r}") from e
    log.info("announced %s -> %s (%s)", rev.user_id, rev.revision_id, reason)
    return event


def announce_forget(kafka: KafkaSettings, user_id: str, sha256s: list[str]) -> dict:
    """Produce the forget.v1 event of ``user_id`` on the promotions topic (serving workers drop every cached copy of
    the listed artifacts) and wait for the acknowledgement; returns the payload."""
    event = {
        "schema": "forget.v1",
        "user_id": user_id,
        "sha256s": sorted(set(sha256s)),
        "forgotten_at": datetime.now(UTC).isoformat(),
    }
    try:
        _producer(kafka).send(kafka.topic_promotions, key=user_id.encode(), value=orjson.dumps(event)).get(timeout=30)
    except KafkaError as e:
        raise AnnounceError(f"the forgetting of {user_id!r} was not announced: {e!r}") from e
    log.info("announced forget of %s (%d artifact(s))", user_id, len(event["sha256s"]))
    return event
