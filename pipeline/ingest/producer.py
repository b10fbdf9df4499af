"""Producer SDK: validate interaction events locally and write them to Kafka (key = user_id, acks=all).

For applications that write to Kafka directly instead of calling the ingest API::

    from pipeline.ingest.producer import EventProducer
    with EventProducer() as producer:
        result = producer.send([{"event_id": ..., "user_id": "u1", "kind": "message", ...}])
        result.raise_for_rejected()

``send`` returns only after the broker acknowledged every valid event (or raises ProducerError); invalid events
are not sent and come back with their reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.config import EventSettings, KafkaSettings
from pipeline.domain.errors import InvalidInput, Unavailable
from pipeline.domain.events import Event, EventLimits, Rejected, validate
from pipeline.ingest.codec import encode_event
from pipeline.observability import metrics

log = logging.getLogger(__name__)


class ProducerError(Unavailable):
    """The broker did not acknowledge events; sending the same events again is safe (event_id dedups)."""

    code = "broker_unavailable"


@dataclass
class SendResult:
    """What happened to each event of one ``send``, by its index in the input."""

    accepted: list[tuple[int, Event]] = field(default_factory=list)
    rejected: list[tuple[int, Rejected]] = field(default_factory=list)

    def raise_for_rejected(self) -> None:
        if self.rejected:
            i, rej = self.rejected[0]
            detail = "; ".join(f"{r.field or '<event>'}: {r.message}" for r in rej.reasons)
            raise InvalidInput(f"{len(self.rejected)} event(s) rejected; first (index {i}): {detail}")


class EventProducer:
    """Validates and produces interaction events. Thread-safe (kafka-python's producer is)."""

    def __init__(self, kafka: KafkaSettings | None = None, events: EventSettings | None = None) -> None:
        self._kafka = kafka or KafkaSettings()
        ev = events or EventSettings()
        self.limits = EventLimits(ev.max_text_bytes, ev.max_meta_bytes)
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self._kafka.servers,
                acks="all",
                # Retries may reorder or duplicate records; duplicates are harmless (event_id is the idempotency
                # key) and order within a user only matters by ingestion position, which the buffer assigns.
                retries=5,
                linger_ms=5,
                request_timeout_ms=self._kafka.request_timeout_ms,
                client_id="persona-producer",
            )
        except KafkaError as e:
            raise ProducerError(f"cannot reach Kafka at {self._kafka.bootstrap_servers}: {e}") from e

    def check(self, objs: Iterable[Mapping[str, Any] | Event]) -> SendResult:
        """Validate without sending."""
        result = SendResult()
        for i, obj in enumerate(objs):
            ev = obj if isinstance(obj, Event) else validate(obj, self.limits)
            if isinstance(ev, Rejected):
                result.rejected.append((i, ev))
            else:
                result.accepted.append((i, ev))
        return result

    def send(self, objs: Iterable[Mapping[str, Any] | Event], *, timeout_s: float = 30.0) -> SendResult:
        """Validate ``objs``, produce the valid ones and wait for the broker's acknowledgement of all of them."""
        result = self.check(objs)
        self.produce_valid(result.accepted, timeout_s=timeout_s)
        metrics.PRODUCER_EVENTS.labels("accepted").inc(len(result.accepted))
        metrics.PRODUCER_EVENTS.labels("rejected").inc(len(result.rejected))
        return result

    def produce_valid(self, events: list[tuple[int, Event]], *, timeout_s: float) -> None:
        """Produce already validated events and wait until every one is acknowledged."""
        futures = []
        try:
            for _, ev in events:
                futures.append(
                    self._producer.send(self._kafka.topic_events, key=ev.user_id.encode(), value=encode_event(ev))
                )
            self._producer.flush(timeout=timeout_s)
            for f in futures:
                f.get(timeout=timeout_s)
        except KafkaError as e:
            raise ProducerError(f"Kafka did not acknowledge {len(events)} event(s): {e!r}") from e

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
