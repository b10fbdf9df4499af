"""The adapter-lifecycle topic persona.promotions.v1 (key = user_id): announcing alias moves and forgets, and
listening to them in a serving worker, so the next request of a promoted user serves the new revision.

`Announcer` produces promotion.v1 and forget.v1 records and waits for the broker's acknowledgement. Every serving
worker must hear every record, so each `PromotionListener` is a consumer group of its own: ``group_id`` stable per
worker (``persona-serving-{worker_id}``) and its position committed after each handled batch, so a worker that was
down resumes where it stopped and hears the forgets it missed. A brand-new group starts at the end of the topic (no
replay of history: a new worker resolves every alias from the registry anyway) and commits that start position at
once, so a crash before its first record does not lose what came in between. Handling is at least once: a record
handled but not yet committed when a worker dies is handled again (invalidate, prefetch and forget are idempotent).
If a group's committed position is gone (the broker's offset retention), it starts at the end again; the
worker's start-up check of its disk cache against the registry still removes forgotten copies then. Invalid records
are logged and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from pipeline.config import SCHEMAS_DIR, KafkaSettings
from pipeline.domain.errors import InvalidInput, Unavailable
from pipeline.domain.revisions import Revision

log = logging.getLogger(__name__)


class AnnounceError(Unavailable):
    """A promotion or forget record was not acknowledged by the broker."""

    code = "broker_unavailable"


def promotion_event(rev: Revision, *, reason: str, promoted_at: datetime | None = None) -> dict[str, Any]:
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


def forget_event(user_id: str, sha256s: list[str]) -> dict[str, Any]:
    """The forget.v1 payload (schemas/events/forget.v1.json): every cached copy of ``sha256s`` is to be dropped."""
    return {
        "schema": "forget.v1",
        "user_id": user_id,
        "sha256s": sorted(set(sha256s)),
        "forgotten_at": datetime.now(UTC).isoformat(),
    }


class Announcer:
    """Produces the adapter-lifecycle records of one process (its Kafka producer is made on first use)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def promotion(self, rev: Revision, *, reason: str, promoted_at: datetime | None = None) -> dict[str, Any]:
        """Announce that ``rev`` serves its user now; returns the payload once the broker acknowledged it."""
        event = promotion_event(rev, reason=reason, promoted_at=promoted_at)
        self._send(rev.user_id, event, f"promotion of {rev.revision_id} for {rev.user_id!r}")
        log.info("announced %s -> %s (%s)", rev.user_id, rev.revision_id, reason)
        return event

    def forget(self, user_id: str, sha256s: list[str]) -> dict[str, Any]:
        """Announce that ``user_id`` was forgotten; returns the payload once the broker acknowledged it."""
        event = forget_event(user_id, sha256s)
        self._send(user_id, event, f"the forgetting of {user_id!r}")
        log.info("announced forget of %s (%d artifact(s))", user_id, len(event["sha256s"]))
        return event

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=10)
                self._producer = None

    def _send(self, user_id: str, event: dict[str, Any], what: str) -> None:
        try:
            future = self._client().send(self.kafka.topic_promotions, key=user_id.encode(), value=orjson.dumps(event))
            future.get(timeout=30)
        except KafkaError as e:
            raise AnnounceError(f"{what} was not announced: {e!r}") from e

    def _client(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.kafka.servers, acks="all", retries=5, client_id="persona-promotions"
                    )
                except KafkaError as e:
                    raise AnnounceError(f"cannot reach Kafka at {self.kafka.bootstrap_servers}: {e!r}") from e
            return self._producer


@cache
def _validator(name: str = "promotion.v1") -> Draft202012Validator:
    schema = orjson.loads((SCHEMAS_DIR / "events" / f"{name}.json").read_bytes())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def parse_promotion(value: bytes) -> dict[str, Any]:
    """The promotion.v1 or forget.v1 payload in ``value`` (by its ``schema``); InvalidInput naming the first
    problem if it is neither."""
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"promotion record is not JSON: {e}") from e
    name = event.get("schema") if isinstance(event, dict) else None
    name = name if name in ("promotion.v1", "forget.v1") else "promotion.v1"
    error = next(iter(_validator(name).iter_errors(event)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(record)"
        raise InvalidInput(f"promotion record is not {name}: {where}: {error.message}")
    return event


class PromotionListener:
    """Calls ``on_promotion(event)`` for each promotion.v1 event and ``on_forget(event)`` for each forget.v1 event,
    from a thread of its own (``start``/``stop``).

    ``ready`` is set once the consumer has its partitions and its start position is fixed and committed:
    promotions announced after that are heard, also across a restart with the same ``group_id``. The position is
    committed after each batch is handled. A callback that raises is logged; the listener goes on (that record is
    not retried).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        group_id: str,
        on_promotion: Callable[[dict[str, Any]], None],
        *,
        on_forget: Callable[[dict[str, Any]], None] | None = None,
        poll_timeout_ms: int = 500,
    ) -> None:
        self.kafka = kafka
        self.group_id = group_id
        self.on_promotion = on_promotion
        self.on_forget = on_forget
        self.poll_timeout_ms = poll_timeout_ms
        self.ready = threading.Event()
        self.heard = 0
        self.skipped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PromotionListener:
        """Start listening in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("the promotion listener is already started")
        consumer = KafkaConsumer(
            self.kafka.topic_promotions,
            bootstrap_servers=self.kafka.servers,
            group_id=self.group_id,
            auto_offset_reset="latest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
            request_timeout_ms=self.kafka.request_timeout_ms,
            client_id=f"persona-promotions-{self.group_id}",
        )
        self._thread = threading.Thread(target=self._run, args=(consumer,), name="promotion-listener", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening and close the consumer (waits up to ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until the consumer has its partitions (True) or ``timeout_s`` passed (False)."""
        return self.ready.wait(timeout_s)

    def _run(self, consumer: KafkaConsumer) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batches = consumer.poll(timeout_ms=self.poll_timeout_ms)
                except KafkaError as e:  # the broker went away: keep trying, a worker must not go deaf
                    log.warning("polling %s failed: %r; retrying", self.kafka.topic_promotions, e)
                    self._stop.wait(1.0)
                    continue
                handled: dict[Any, int] = {}
                for tp, records in batches.items():
                    for record in records:
                        self._handle(record.value)
                        handled[tp] = record.offset + 1
                if not self.ready.is_set() and consumer.assignment():
                    # Fix the positions now (the committed ones, or the end for a new group: "latest" is resolved
                    # lazily, which could skip records announced between the assignment and the first fetch) and
                    # commit them, so a restart resumes from here even if nothing arrives before it.
                    try:
                        self._commit(consumer, {tp: consumer.position(tp) for tp in consumer.assignment()})
                        self.ready.set()
                    except KafkaError as e:
                        log.warning("fixing the start of %s failed: %r; retrying", self.group_id, e)
                        if handled:
                            self._commit(consumer, handled)
                elif handled:
                    self._commit(consumer, handled)
        except Exception:
            log.exception("the promotion listener stopped on an error")
        finally:
            consumer.close()

    def _commit(self, consumer: KafkaConsumer, positions: dict[Any, int]) -> None:
        try:
            consumer.commit({tp: OffsetAndMetadata(pos, "", -1) for tp, pos in positions.items()})
        except KafkaError as e:  # the records are handled; a restart may hear them again (harmless)
            log.warning("committing the position of %s failed: %r", self.group_id, e)

    def _handle(self, value: bytes) -> None:
        try:
            event = parse_promotion(value)
        except InvalidInput as e:
            self.skipped += 1
            log.warning("skipping a record of %s: %s", self.kafka.topic_promotions, e)
            return
        self.heard += 1
        try:
            if event["schema"] == "forget.v1":
                if self.on_forget is not None:
                    self.on_forget(event)
            else:
                self.on_promotion(event)
        except Exception:
            log.exception("%s callback failed for %s", event["schema"], event["user_id"])
