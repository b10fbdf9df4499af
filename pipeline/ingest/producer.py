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
import math
import threading
import time
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

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s=max(1.0, retry_after_s))


def close_producer(client: KafkaProducer, timeout_s: float) -> None:
    """Close a Kafka client that may be broken, for good. kafka-python's ``close`` flushes first and, when the flush
    times out (batches stuck on a dead broker), raises before it stops the sender thread, which would then live on
    and deliver the stuck batches whenever the broker returns; here the sender is then stopped by force."""
    try:
        client.close(timeout=timeout_s)
    except Exception as e:
        log.debug("closing a failed Kafka client: %s", e)
        sender = getattr(client, "_sender", None)  # kafka-python 3.0: the background I/O thread
        if sender is not None and sender.is_alive():
            sender.force_close()


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
    """Validates and produces interaction events. Thread-safe (kafka-python's producer is).

    The Kafka client is built at construction (``connect=True``, the SDK: ProducerError when the broker does not
    answer) or at the first send (``connect=False``, the ingest API: it starts while the broker is down). After a
    failed send the client is dropped and a new one built by a later send, at most once per ``rebuild_interval_s``:
    a client can stay broken after a broker restart, and a fresh one works at once. In between, sends fail fast
    with ProducerError (its ``retry_after_s`` says when the next attempt is due).
    """

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        events: EventSettings | None = None,
        *,
        connect: bool = True,
        rebuild_interval_s: float = 2.0,
        max_block_s: float | None = None,
    ) -> None:
        self._kafka = kafka or KafkaSettings()
        ev = events or EventSettings()
        self.limits = EventLimits(ev.max_text_bytes, ev.max_meta_bytes)
        self.rebuild_interval_s = rebuild_interval_s
        self._max_block_ms = int((max_block_s or self._kafka.request_timeout_ms / 1000) * 1000)
        self._request_timeout_ms = min(self._kafka.request_timeout_ms, max(1000, self._max_block_ms))
        self._lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._built_at = -math.inf  # monotonic time of the last build attempt
        self._building: threading.Thread | None = None
        #: The last failure (None once a send was acknowledged after it): what /healthz reports.
        self.last_error: str | None = None
        if connect:
            self._client(wait_s=math.inf)

    def _build(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self._kafka.servers,
            acks="all",
            # Retries may reorder or duplicate records; duplicates are harmless (event_id is the idempotency
            # key) and order within a user only matters by ingestion position, which the buffer assigns. Not
            # idempotent: an idempotent producer can be left in a fatal state by a broker restart, and event_id
            # already makes duplicates harmless.
            retries=5,
            enable_idempotence=False,
            linger_ms=5,
            # Up to 256 KiB per partition batch (not the 16 KiB default): many concurrent requests then share a few
            # large produce requests, which the S3-backed embedded broker writes as one object each.
            batch_size=256 * 1024,
            max_block_ms=self._max_block_ms,
            bootstrap_timeout_ms=self._max_block_ms,  # building the client waits no longer than a send would
            request_timeout_ms=self._request_timeout_ms,
            # A batch the broker never acknowledges is failed after this long, never delivered later by a client
            # the caller has given up on.
            delivery_timeout_ms=self._request_timeout_ms + 5 + 1000,
            client_id="persona-producer",
        )

    def _client(self, wait_s: float | None = None) -> KafkaProducer:
        """The current Kafka client; builds one when there is none and the last attempt is ``rebuild_interval_s``
        old. One build at a time, in a thread of its own (a build can block for the broker's request timeout when
        the broker accepts connections but does not answer): callers wait for it at most ``wait_s`` (default: the
        produce timeout), then fail with ProducerError."""
        with self._lock:
            if self._producer is not None:
                return self._producer
            if self._building is None:
                wait = self._built_at + self.rebuild_interval_s - time.monotonic()
                if wait > 0:
                    raise ProducerError(
                        f"the broker at {self._kafka.bootstrap_servers} did not answer ({self.last_error}); "
                        f"next attempt in {wait:.1f}s",
                        retry_after_s=wait,
                    )
                self._built_at = time.monotonic()
                self._building = threading.Thread(target=self._build_now, name="persona-producer-build", daemon=True)
                self._building.start()
            building = self._building
        timeout = self._max_block_ms / 1000 if wait_s is None else wait_s
        building.join(None if math.isinf(timeout) else timeout)
        with self._lock:
            if self._producer is not None:
                return self._producer
        raise ProducerError(
            f"the broker at {self._kafka.bootstrap_servers} did not answer"
            + (f" ({self.last_error})" if self.last_error else " (still connecting)"),
            retry_after_s=self.rebuild_interval_s,
        )

    def _build_now(self) -> None:
        try:
            producer = self._build()
        except Exception as e:  # KafkaError mostly; anything else is reported the same way, never raised here
            metrics.INGEST_PRODUCER_REBUILDS.labels("failed").inc()
            self.last_error = f"cannot reach Kafka at {self._kafka.bootstrap_servers}: {e!r}"
            metrics.INGEST_BROKER_UP.set(0)
            log.warning("%s", self.last_error)
            with self._lock:
                self._building = None
            return
        metrics.INGEST_PRODUCER_REBUILDS.labels("built").inc()
        with self._lock:
            self._producer = producer
            self._building = None

    def _failed(self, client: KafkaProducer, error: str) -> None:
        """Drop ``client`` (if still current) so that the next send builds a new one; close it in the background,
        after the sends in flight on it had their time."""
        self.last_error = error
        metrics.INGEST_BROKER_UP.set(0)
        with self._lock:
            if self._producer is not client:
                return
            self._producer = None
        log.warning("broker failure, the Kafka client will be rebuilt: %s", error)
        threading.Thread(
            target=close_producer, args=(client, self._max_block_ms / 1000), name="persona-producer-close", daemon=True
        ).start()

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
        if not events:
            return
        deadline = time.monotonic() + timeout_s  # the whole call, a client build included

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        client = self._client(wait_s=timeout_s)
        futures = []
        try:
            for _, ev in events:
                futures.append(client.send(self._kafka.topic_events, key=ev.user_id.encode(), value=encode_event(ev)))
            client.flush(timeout=left())
            for f in futures:
                f.get(timeout=left())
        except KafkaError as e:
            self._failed(client, f"Kafka did not acknowledge {len(events)} event(s): {e!r}")
            raise ProducerError(
                f"Kafka did not acknowledge {len(events)} event(s): {e!r}", retry_after_s=self.rebuild_interval_s
            ) from e
        if self.last_error is not None:
            log.info("the broker acknowledges again")
        self.last_error = None
        metrics.INGEST_BROKER_UP.set(1)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            client, self._producer = self._producer, None
        if client is not None:
            close_producer(client, timeout_s)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
