"""Buffer consumer: Kafka topic persona.interactions.v1 -> per-user buffers in PostgreSQL.

The order of one poll batch (the checkpoint, as in quix-streams) is fixed:

1. decode and validate every record;
2. write the valid ones in ONE database transaction (duplicates skipped by event_id) and commit it;
3. produce the invalid ones to the dead-letter topic and wait for the broker's acknowledgement;
4. commit the Kafka offsets (last offset + 1 per partition).

A crash anywhere before step 4 redelivers the batch: step 2 is idempotent, so the buffers still hold each event
once; step 3 may then repeat a dead-letter record (its ``persona.dlq.source`` header identifies the duplicate).
A crash after step 4 loses nothing because steps 2 and 3 completed first. Step 2 of batch N is sent to PostgreSQL
in pipeline mode and applied there while batch N+1 is polled and decoded in this thread (see ``run``).

The consumer stops only when told to (``stop()``, SIGTERM). A record that cannot be decoded, validated or written
for a reason of its own goes to the dead-letter topic with that reason: ``internal_error`` (with the exception's
class) when handling it raised something unexpected, ``id_conflict`` when its event_id is stored with other
content, ``unknown_app`` when its ``app`` is not a registered application, ``foreign_user`` when another application
owns its user, ``db_rejected`` when PostgreSQL refused it alone. An event of a forgotten user that occurred at or
before the forget is dropped (counted in ``persona_forgotten_events_dropped_total``, never dead-lettered: the
dead-letter topic would keep the forgotten user's data). A record too large for the dead-letter topic goes there
truncated (see codec.fit_dead_letter). Transient errors of the broker or of PostgreSQL (connection refused, a
server restart, a rebalance, a failed commit) are retried with capped exponential backoff and jitter, forever,
each retry logged and counted in ``persona_buffer_retries_total``; nothing moves past a batch until its events
are in the database and its rejects in the dead-letter topic.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from pipeline.config import ConsumerSettings, DatabaseSettings, EventSettings, KafkaSettings
from pipeline.domain.backoff import Backoff
from pipeline.domain.events import EventLimits, Reason, Rejected, split_of
from pipeline.ingest.codec import (
    DLQ_OWNER,
    DLQ_STORED_USER,
    DLQ_USER,
    decode_record,
    dlq_headers,
    encode_event,
    fit_dead_letter,
)
from pipeline.ingest.producer import close_producer
from pipeline.observability import metrics
from pipeline.storage import apps as app_store
from pipeline.storage import db
from pipeline.storage.buffers import (
    BufferedEvent,
    Conflict,
    Foreign,
    PendingWrite,
    WriteResult,
    begin_write,
    write_events,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the same transaction may succeed on a new connection (StorageError: could not connect).
_DB_TRANSIENT: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    db.StorageError,
)
# A commit refused because the group rebalanced: the partitions may belong to another member now, which re-reads
# the records from the last committed offset (the database skips what this member wrote). Not worth a retry.
_REBALANCED: tuple[type[Exception], ...] = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
)


#: Longest wait of one offset-commit attempt (then it is retried, with backoff, and logged).
COMMIT_ATTEMPT_MS = 10_000
#: Longest wait of a member without partitions before it asks for a new assignment (see ``_check_assignment``).
IDLE_REJOIN_MAX_S = 300.0
#: Bounds of the stuck-fetch check's two questions (`BufferConsumer._check_fetching`, `records_waiting`).
POSITION_TIMEOUT_MS = 5_000
PROBE_TIMEOUT_MS = 10_000
#: More than this (plus the poll timeout) between two polls: the member was busy elsewhere, not silent.
QUIET_GAP_S = 5.0


class _Stopping(Exception):
    """``stop()`` was called while waiting to retry: leave without finishing the batch (it is redelivered)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record to dead-letter: where it came from, its bytes, why, and reason-specific headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reasons: tuple[Reason, ...]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass
class BatchStats:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    conflicts: int = 0
    forgotten: int = 0


@dataclass
class _Batch:
    """One poll result, decoded: what to write, what to dead-letter, which offsets to commit after."""

    started: float
    records: int = 0
    valid: list[BufferedEvent] = field(default_factory=list)
    invalid: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)
    pending: PendingWrite | None = None
    #: The original record of each valid event, by (partition, offset): dead-lettered as is on a conflict.
    sources: dict[tuple[int, int], Any] = field(default_factory=dict)
    #: Which Kafka client polled it (`BufferConsumer._clients`): a newer client does not commit its offsets.
    client: int = 0


def _internal_error(e: BaseException, doing: str) -> Reason:
    return Reason("", "internal_error", f"{type(e).__name__} while {doing}: {str(e)[:300]}")


class Stall:
    """A watchdog over a loop that must come back from its calls: ``touch(what)`` when it starts one (or makes
    progress in it); a thread calls ``report(what, seconds)`` once when no touch came for ``limit_s`` seconds, and
    again only after a later touch and another ``limit_s`` without one. ``limit_s`` <= 0: no thread."""

    def __init__(self, limit_s: float, report: Callable[[str, float], None], check_s: float | None = None) -> None:
        self.limit_s = limit_s
        self.report = report
        self.check_s = check_s if check_s is not None else max(0.05, min(5.0, limit_s / 4))
        self._at = time.monotonic()
        self._what = "start"
        self._reported = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self, what: str) -> None:
        self._at, self._what, self._reported = time.monotonic(), what, False

    def __enter__(self) -> Stall:
        self.touch("start")
        if self.limit_s > 0:
            self._thread = threading.Thread(target=self._watch, name="consumer-stall-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(self.check_s):
            at, what = self._at, self._what
            waited = time.monotonic() - at
            if waited >= self.limit_s and not self._reported:
                self._reported = True
                self.report(what, waited)


class Lost:
    """How long a condition has held, from the observations given to `lost`: True once it has held ``limit_s``
    without a break (then the clock starts again). ``limit_s`` <= 0: never."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.since: float | None = None

    def lost(self, holds: bool, now: float) -> bool:
        if not holds or self.limit_s <= 0:
            self.since = None
            return False
        if self.since is None:
            self.since = now
            return False
        if now - self.since < self.limit_s:
            return False
        self.since = None
        return True


def _report_stall(what: str, seconds: float) -> None:
    metrics.BUFFER_RETRIES.labels("kafka" if what.startswith("kafka") else "database", "stall").inc()
    log.error(
        "no progress for %.0f s: still in %s (not returned, no retry made); every thread's stack follows on stderr",
        seconds,
        what,
    )
    faulthandler.dump_traceback(all_threads=True)


class BufferConsumer:
    """One member of the buffer consumer group. ``run`` loops until ``stop()`` (or SIGTERM via ``main``).

    Creating one waits (retrying with backoff) until the broker answers."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        consumer: ConsumerSettings | None = None,
        database: DatabaseSettings | None = None,
        events: EventSettings | None = None,
    ) -> None:
        self.kafka = kafka or KafkaSettings()
        self.cfg = consumer or ConsumerSettings()
        self.database = database or DatabaseSettings()
        ev = events or EventSettings()
        self.limits = EventLimits(ev.max_text_bytes, ev.max_meta_bytes)
        self.holdout_fraction = ev.holdout_fraction
        self.totals = BatchStats()
        self.retries = 0  # transient errors retried so far (all dependencies)
        self.first_record_at: float | None = None  # monotonic time of the first record ``run`` received
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._dlq: KafkaProducer | None = None
        self._unassigned_since: float | None = None  # monotonic time since this member holds no partition
        self._idle_rejoins = 0  # rejoins asked for since this member last held a partition
        self._apps: frozenset[str] = frozenset()  # registered applications, re-read every apps_refresh_s
        self._apps_read_at = -math.inf  # monotonic time of the last read
        self._stall = Stall(self.cfg.stall_report_s, _report_stall)  # watching while `run` runs
        self._coordinator_watch = Lost(self.cfg.coordinator_lost_s)
        self._quiet_since = time.monotonic()  # since this client last received records (or was built, or assigned)
        self._polled_at = time.monotonic()  # the end of the last poll (`_check_fetching`)
        self._clients = 0  # Kafka clients built since the first (`_check_coordinator`)
        self._consumer: KafkaConsumer = self._retry("kafka", "connect", self._new_consumer)

    def _new_consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(
            bootstrap_servers=self.kafka.servers,
            group_id=self.cfg.group_id,
            client_id=f"persona-buffer-{os.getpid()}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.max_poll_records,
            session_timeout_ms=self.cfg.session_timeout_ms,
            heartbeat_interval_ms=max(300, self.cfg.session_timeout_ms // 3),
            request_timeout_ms=self.kafka.request_timeout_ms,
        )
        consumer.subscribe([self.kafka.topic_events], listener=_AssignmentWatch(self))
        return consumer

    def _dlq_producer(self) -> KafkaProducer:
        if self._dlq is None:
            self._dlq = KafkaProducer(
                bootstrap_servers=self.kafka.servers,
                acks="all",
                retries=5,
                # Duplicates in the DLQ are harmless (the source header names the record), and an idempotent
                # producer can be left in a fatal state by a broker restart.
                enable_idempotence=False,
                max_request_size=self.cfg.dlq_max_record_bytes + 65536,
                request_timeout_ms=self.kafka.request_timeout_ms,
                client_id="persona-buffer-dlq",
            )
        return self._dlq

    def _drop_dlq_producer(self) -> None:
        if self._dlq is not None:
            dlq, self._dlq = self._dlq, None
            close_producer(dlq, 1.0)

    # --- retries ---
    def _retry(
        self,
        dependency: str,
        operation: str,
        fn: Callable[[], T],
        transient: tuple[type[Exception], ...] = (KafkaError,),
        on_error: Callable[[Exception], None] | None = None,
    ) -> T:
        """``fn()``, retried after each transient error with capped exponential backoff and jitter, until it
        succeeds or ``stop()`` is called (then _Stopping)."""
        backoff = Backoff(self.cfg.retry_initial_s, max(self.cfg.retry_initial_s, self.cfg.retry_max_s))
        while True:
            self._stall.touch(f"{dependency} {operation}")
            try:
                return fn()
            except transient as e:
                if on_error is not None:
                    on_error(e)
                if self._stop.is_set():
                    raise _Stopping() from e
                wait = backoff.next()
                self.retries += 1
                metrics.BUFFER_RETRIES.labels(dependency, operation).inc()
                log.warning(
                    "%s %s failed (%s: %s); retry %d in %.1fs",
                    dependency,
                    operation,
                    type(e).__name__,
                    str(e)[:300],
                    backoff.attempt,
                    wait,
                )
                if self._stop.wait(wait):
                    raise _Stopping() from e

    # --- lifecycle ---
    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stop.set()

    def run(self, *, idle_exit_s: float | None = None, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        """Poll and process batches until stopped (or, with ``idle_exit_s``, until no record came for that long).

        Pipelined: batch N's transaction is sent to PostgreSQL without waiting (``begin_write``), and batch N+1 is
        polled and decoded while the server applies it. Batch N's offsets are still committed only after its
        transaction committed.
        """
        last_record = time.monotonic()
        self.first_record_at = None
        in_flight: _Batch | None = None
        try:
            with self._stall:  # an error in the log, with the stacks, when one call does not come back (`Stall`)
                while not self._stop.is_set():
                    records = self._poll()
                    batch = self._prepare(records) if records else None
                    if in_flight is not None:
                        self._stall.touch("database write")
                        stats = self._finish(in_flight, self._end_write(in_flight))
                        in_flight = None
                        if on_batch is not None:
                            on_batch(stats)
                    if batch is None:
                        if idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                            break
                        continue
                    last_record = time.monotonic()
                    if self.first_record_at is None:
                        self.first_record_at = last_record
                    self._stall.touch("database write")
                    self._begin_write(batch)
                    in_flight = batch
                if in_flight is not None:  # stopping: finish the batch in hand (its records were read)
                    self._finish(in_flight, self._end_write(in_flight))
        except _Stopping:
            log.info("stopped while retrying; the uncommitted records will be redelivered")
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        except Exception as e:
            log.warning("closing the Kafka consumer: %s", e)
        finally:
            self._drop_dlq_producer()
            self._drop_connection()

    # --- one batch ---
    def process(self, records: dict[TopicPartition, list]) -> BatchStats:
        """Handle one poll result in the documented order, without pipelining; returns what it did."""
        batch = self._prepare(records)
        return self._finish(batch, self._write(batch))

    def _poll(self) -> dict[TopicPartition, list]:
        def poll() -> dict[TopicPartition, list]:
            records = self._consumer.poll(timeout_ms=self.cfg.poll_timeout_ms)
            self._check_assignment()
            # A new client (either check): what the old one polled is redelivered to the group.
            if self._check_coordinator() or self._check_fetching(bool(records)):
                return {}
            return records

        return self._retry("kafka", "poll", poll)

    def _check_coordinator(self) -> bool:
        """A new Kafka client when the group's coordinator has stayed unknown for ``coordinator_lost_s``: kafka-python
        3.0 can stop finding it after the broker reset its connections mid-request (the fault bench, after an outage
        of tansu's S3 storage: every poll returned nothing, without an error, for minutes, while the broker was
        back), and a poll fetches nothing while it is unknown. True when it built a new client."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        unknown = coordinator is not None and coordinator.coordinator_unknown()
        if not self._coordinator_watch.lost(unknown, time.monotonic()):
            return False
        log.warning(
            "the group coordinator of %s has been unknown for %.0f s; closing the Kafka client and building a new "
            "one (uncommitted records will be redelivered)",
            self.cfg.group_id,
            self.cfg.coordinator_lost_s,
        )
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        """Close the Kafka client and build a new one (counted as ``operation="reconnect"``); the records the old one
        polled and this member did not commit are redelivered to the group (`_commit` skips the old client's)."""
        metrics.BUFFER_RETRIES.labels("kafka", "reconnect").inc()
        try:
            self._consumer.close(autocommit=False)
        except Exception as e:
            log.warning("closing the Kafka client: %s", e)
        self._clients += 1
        self._consumer = self._retry("kafka", "connect", self._new_consumer)
        self._quiet_since = time.monotonic()

    def _check_fetching(self, received: bool) -> bool:
        """A new Kafka client when this member holds partitions, has received no record for ``fetch_stuck_s``, and a
        fresh client sees records past this one's positions: in the fault bench, after an outage of tansu's S3
        storage, kafka-python kept a fetch in flight that never completed (the coordinator known, nothing received,
        nothing logged, for minutes). Only positive evidence rebuilds: a position or a probe fetch that cannot be had
        now leaves the client as it is until the next period. True when it built a new client."""
        now = time.monotonic()
        gap, self._polled_at = now - self._polled_at, now
        # Quiet means polls that returned nothing: time spent elsewhere (a database write retried through an outage)
        # is not the client's silence.
        if received or self.cfg.fetch_stuck_s <= 0 or gap > QUIET_GAP_S + self.cfg.poll_timeout_ms / 1000:
            self._quiet_since = now
            return False
        if now - self._quiet_since < self.cfg.fetch_stuck_s:
            return False
        self._quiet_since = now  # looked at once a period
        assigned = list(self._consumer.assignment())
        if not assigned:
            return False
        try:
            positions = {tp: self._consumer.position(tp, timeout_ms=POSITION_TIMEOUT_MS) for tp in assigned}
            waiting = records_waiting(self.kafka, {tp: p for tp, p in positions.items() if p is not None})
        except Exception as e:  # the broker or the client cannot say now: no evidence either way
            log.info("could not look for records past this member's positions (%s); next look in %.0f s",
                     e, self.cfg.fetch_stuck_s)  # fmt: skip
            return False
        if not waiting:
            log.debug("no record received for %.0f s and none waiting past %s", self.cfg.fetch_stuck_s, positions)
            return False
        log.warning(
            "no record received for %.0f s although a fresh client fetches records past this member's positions in "
            "%s; closing the Kafka client and building a new one (uncommitted records will be redelivered)",
            self.cfg.fetch_stuck_s,
            ", ".join(f"{tp.topic}[{tp.partition}] at {positions[tp]}" for tp in sorted(waiting)),
        )
        self._rebuild()
        return True

    def _check_assignment(self) -> None:
        """Rejoin the group when this member has held no partition for ``idle_rejoin_s`` although the topic has
        some: after a broker outage kafka-python can settle on an assignment made without the topic's metadata
        (every member empty) and never notice the partitions coming back."""
        since = self._unassigned_since  # set by _AssignmentWatch when a rebalance gave this member nothing
        wait = min(IDLE_REJOIN_MAX_S, self.cfg.idle_rejoin_s * 2**self._idle_rejoins)
        if self.cfg.idle_rejoin_s <= 0 or since is None or time.monotonic() - since < wait:
            return
        if self._consumer.assignment():
            self._unassigned_since = None
            return
        partitions = known_partitions(self._consumer, self.kafka.topic_events)
        if not partitions:  # the broker still cannot say them: a rejoin now would be just as blind
            self._unassigned_since = time.monotonic() - wait / 2
            return
        self._unassigned_since = None  # until the next assignment: a rejoin in progress is not idleness
        self._idle_rejoins += 1
        log.warning(
            "no partition of %s (%d partitions) assigned to this member for %.0fs; asking the group to rebalance",
            self.kafka.topic_events,
            len(partitions),
            wait,
        )
        metrics.BUFFER_RETRIES.labels("kafka", "rejoin").inc()
        self._consumer.unsubscribe()
        self._consumer.subscribe([self.kafka.topic_events], listener=_AssignmentWatch(self))

    def _prepare(self, records: dict[TopicPartition, list]) -> _Batch:
        """Step 1: decode and validate; note the offsets to commit. Never raises for a record's sake."""
        batch = _Batch(started=time.perf_counter(), client=self._clients)
        for tp, recs in records.items():
            for rec in recs:
                try:
                    result = decode_record(rec.value, rec.key, self.limits)
                    if isinstance(result, Rejected):
                        batch.invalid.append(self._dead_letter_of(rec, result.reasons))
                    elif self.cfg.require_registered_app and not self._registered(result.app):
                        reason = Reason(
                            "app",
                            "unknown_app",
                            f"app {result.app!r} is not a registered application (`persona apps create`)",
                        )
                        batch.invalid.append(self._dead_letter_of(rec, (reason,)))
                    else:
                        split = split_of(result.user_id, result.event_id, self.holdout_fraction)
                        batch.valid.append(BufferedEvent(result, split, tp.partition, rec.offset))
                        batch.sources[(tp.partition, rec.offset)] = rec
                except Exception as e:  # a bug on some input: the record is dead-lettered, the rest goes on
                    log.exception("unexpected error decoding %s/%s/%s", rec.topic, rec.partition, rec.offset)
                    batch.invalid.append(self._dead_letter_of(rec, (_internal_error(e, "decoding the record"),)))
            if recs:
                batch.records += len(recs)
                batch.offsets[tp] = OffsetAndMetadata(recs[-1].offset + 1, "", -1)
        return batch

    def _registered(self, app: str) -> bool:
        """Whether ``app`` is a registered application; the list is re-read every ``apps_refresh_s``, and at most once
        a second when a record names an app not in it (a new application's first events)."""
        now = time.monotonic()
        age = now - self._apps_read_at
        if age >= self.cfg.apps_refresh_s or (app not in self._apps and age >= 1.0):

            def read() -> frozenset[str]:
                # A connection of its own: the batch connection may be in the middle of a pipelined write.
                with db.connect(self.database, autocommit=True) as conn:
                    return app_store.app_ids(conn)

            self._apps = self._retry("database", "read_apps", read, _DB_TRANSIENT)
            self._apps_read_at = now
        return app in self._apps

    @staticmethod
    def _dead_letter_of(rec: Any, reasons: tuple[Reason, ...], **headers: str) -> DeadLetter:
        return DeadLetter(rec.topic, rec.partition, rec.offset, rec.key, rec.value, reasons, headers)

    def _finish(self, batch: _Batch, written: tuple[WriteResult, list[DeadLetter]]) -> BatchStats:
        """Steps 3 and 4 (step 2, the DB write, is done): dead-letter, then commit offsets; count."""
        result, db_refused = written
        conflicts = [self._conflict(batch, c) for c in result.conflicts]
        foreign = [self._foreign(batch, f) for f in result.foreign]
        invalid = batch.invalid + db_refused + conflicts + foreign
        self._dead_letter(invalid)  # before the offsets move past them
        if self.cfg.failpoint == "after_db_commit":
            log.warning("failpoint after_db_commit: killing this process before the offset commit")
            os.kill(os.getpid(), signal.SIGKILL)
        self._commit(batch.offsets, batch.client)

        stats = BatchStats(
            batch.records, result.inserted, result.duplicates, len(invalid), len(conflicts), result.forgotten
        )
        for kind, n in result.inserted_by_kind.items():
            metrics.BUFFER_EVENTS.labels(kind).inc(n)
        metrics.BUFFER_DUPLICATES.inc(result.duplicates)
        metrics.BUFFER_ID_CONFLICTS.inc(len(conflicts))
        metrics.FOREIGN_EVENTS.labels("consumer").inc(len(foreign))
        if result.forgotten:
            metrics.FORGOTTEN_EVENTS_DROPPED.labels("consumer").inc(result.forgotten)
            log.info("dropped %d event(s) of forgotten users (they occurred before the forget)", result.forgotten)
        metrics.BUFFER_BATCH_RECORDS.observe(stats.records)
        metrics.BUFFER_BATCH_SECONDS.observe(time.perf_counter() - batch.started)
        self.totals.records += stats.records
        self.totals.inserted += stats.inserted
        self.totals.duplicates += stats.duplicates
        self.totals.dead_lettered += stats.dead_lettered
        self.totals.conflicts += stats.conflicts
        self.totals.forgotten += stats.forgotten
        return stats

    def _foreign(self, batch: _Batch, f: Foreign) -> DeadLetter:
        reason = Reason(
            "user_id",
            "foreign_user",
            f"user {f.user_id!r} belongs to another application than {f.app!r}; an application sends events of its "
            "own users only",
        )
        return self._skipped(batch, f, reason, {DLQ_USER: f.user_id, DLQ_OWNER: f.owner})

    def _conflict(self, batch: _Batch, c: Conflict) -> DeadLetter:
        reason = Reason(
            "event_id",
            "id_conflict",
            f"event_id {c.event_id} is already stored with different content (for user {c.stored_user_id!r}); "
            "the first event with an id is kept, send a new event_id for a new event",
        )
        return self._skipped(batch, c, reason, {DLQ_USER: c.user_id, DLQ_STORED_USER: c.stored_user_id})

    def _skipped(self, batch: _Batch, s: Conflict | Foreign, reason: Reason, headers: dict[str, str]) -> DeadLetter:
        """The dead letter of an event the write skipped: its original record when the batch read it from Kafka,
        else (written outside the consumer's batches) its canonical bytes."""
        rec = batch.sources.get((s.partition, s.offset)) if s.partition is not None and s.offset is not None else None
        if rec is not None:
            return self._dead_letter_of(rec, (reason,), **headers)
        for b in batch.valid:
            if b.event.event_id == s.event_id and b.event.user_id == s.user_id:
                return _event_dead_letter(b, self.kafka.topic_events, reason, headers)
        return DeadLetter(self.kafka.topic_events, -1, -1, s.user_id.encode(), None, (reason,), headers)

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], client: int) -> None:
        """Commit ``offsets`` of a batch polled by Kafka client number ``client``; not when that client has been
        replaced (`_check_coordinator`, also checked between attempts: a commit retried without a coordinator would
        never reach the poll that checks it): the new client's group re-reads those records."""

        def commit() -> None:
            if self._check_coordinator() or client != self._clients:
                log.info("offsets of a batch polled by a previous Kafka client not committed; it will be redelivered")
                return
            try:
                # Each attempt bounded (a commit takes milliseconds) so that the checks above come round.
                self._consumer.commit(offsets, timeout_ms=min(self.kafka.request_timeout_ms, COMMIT_ATTEMPT_MS))
                metrics.BUFFER_LAST_COMMIT.set_to_current_time()
            except _REBALANCED as e:
                # The new owner re-reads these records and the DB skips them as duplicates.
                metrics.BUFFER_RETRIES.labels("kafka", "commit").inc()
                log.warning("offset commit refused after a rebalance (%s); the records will be redelivered", e)

        self._retry("kafka", "commit", commit)

    def _begin_write(self, batch: _Batch) -> None:
        """Send the batch's transaction without waiting; on any trouble leave it to the synchronous path."""
        if not batch.valid:
            return
        try:
            batch.pending = begin_write(self._connection(), batch.valid)
        except Exception as e:
            log.warning("could not start the batch's transaction (%s); it will be written synchronously", e)
            self._drop_connection()

    def _end_write(self, batch: _Batch) -> tuple[WriteResult, list[DeadLetter]]:
        if batch.pending is not None:
            pending, batch.pending = batch.pending, None
            try:
                return pending.result(), []
            except Exception as e:
                # Rolled back (or the connection died): write it again, with retries; it is idempotent.
                log.warning("the batch's transaction failed (%s); writing it again", e)
                self._drop_connection()
        return self._write(batch)

    def _dead_letter(self, invalid: list[DeadLetter]) -> None:
        """Produce ``invalid`` to the dead-letter topic and wait until the broker acknowledged every record,
        retrying (with a new producer after a failure) until it did."""
        if not invalid:
            return
        records = []
        for d in invalid:
            headers = dlq_headers(d.reasons, d.source, d.headers)
            key, value, headers, truncated = fit_dead_letter(d.key, d.value, headers, self.cfg.dlq_max_record_bytes)
            if truncated:
                metrics.BUFFER_DLQ_TRUNCATED.inc()
                log.warning("dead-letter record for %s truncated to %d bytes", d.source, len(value or b""))
            records.append((key, value, headers))

        def send() -> None:
            dlq = self._dlq_producer()
            futures = [dlq.send(self.kafka.topic_dlq, key=k, value=v, headers=h) for k, v, h in records]
            dlq.flush(timeout=30)
            for f in futures:
                # An unacknowledged DLQ write must stop the batch: committing offsets would lose the record.
                f.get(timeout=30)

        self._retry("kafka", "dead_letter", send, on_error=lambda _e: self._drop_dlq_producer())
        for d in invalid:
            metrics.BUFFER_REJECTED.labels(d.reasons[0].code if d.reasons else "unknown").inc()
            log.info("dead-lettered %s: %s", d.source, "; ".join(f"{r.field}:{r.code}" for r in d.reasons))

    def _write(self, batch: _Batch) -> tuple[WriteResult, list[DeadLetter]]:
        """Write the batch in one transaction, retrying transient errors; isolate rows the DB refuses."""
        if not batch.valid:
            return WriteResult(0, 0, {}), []
        one_by_one = False

        def write() -> tuple[WriteResult, list[DeadLetter]]:
            nonlocal one_by_one
            if one_by_one:
                return self._write_one_by_one(batch.valid)
            conn = self._connection()
            try:
                with conn.transaction():
                    return write_events(conn, batch.valid), []
            except _DB_TRANSIENT:
                raise
            except Exception as e:
                log.error("the database refused the batch (%s: %s); writing its events one by one", type(e), e)
                one_by_one = True
                return self._write_one_by_one(batch.valid)

        return self._retry("database", "write", write, _DB_TRANSIENT, on_error=lambda _e: self._drop_connection())

    def _write_one_by_one(self, batch: list[BufferedEvent]) -> tuple[WriteResult, list[DeadLetter]]:
        conn = self._connection()
        inserted, duplicates, by_kind = 0, 0, dict[str, int]()
        refused: list[DeadLetter] = []
        conflicts: list[Conflict] = []
        foreign: list[Foreign] = []
        forgotten = 0
        with conn.transaction():
            for b in batch:
                try:
                    with conn.transaction():  # a savepoint per event
                        r = write_events(conn, [b])
                except _DB_TRANSIENT:
                    raise
                except psycopg.Error as e:
                    reason = Reason("", "db_rejected", f"the database refused it: {str(e)[:300]}")
                    refused.append(_event_dead_letter(b, self.kafka.topic_events, reason))
                    continue
                except Exception as e:
                    log.exception("unexpected error writing event %s", b.event.event_id)
                    reason = _internal_error(e, "writing the event")
                    refused.append(_event_dead_letter(b, self.kafka.topic_events, reason))
                    continue
                inserted += r.inserted
                duplicates += r.duplicates
                conflicts.extend(r.conflicts)
                foreign.extend(r.foreign)
                forgotten += r.forgotten
                for k, n in r.inserted_by_kind.items():
                    by_kind[k] = by_kind.get(k, 0) + n
        return WriteResult(inserted, duplicates, by_kind, tuple(conflicts), tuple(foreign), forgotten), refused

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database, autocommit=True)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception as e:
                log.debug("closing a broken database connection: %s", e)


def records_waiting(kafka: KafkaSettings, positions: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Which of ``positions``' partitions have a record at or past their position, as a fresh, group-less client
    fetching from there sees it (closed after), with the offset of the first such record: what a client that may
    itself be stuck cannot be asked. (tansu's ListOffsets answered end offsets below what had been consumed, so the
    records are fetched, not the end offsets asked for.) Raises on a broker that does not answer."""
    probe = KafkaConsumer(
        bootstrap_servers=kafka.servers,
        client_id=f"persona-buffer-probe-{os.getpid()}",
        enable_auto_commit=False,
        request_timeout_ms=min(kafka.request_timeout_ms, PROBE_TIMEOUT_MS),
    )
    try:
        probe.assign(list(positions))
        for tp, offset in positions.items():
            probe.seek(tp, offset)
        found: dict[TopicPartition, int] = {}

        def take(timeout_ms: int) -> None:
            for tp, recs in probe.poll(timeout_ms=timeout_ms).items():
                if recs:
                    found.setdefault(tp, recs[0].offset)
                    probe.pause(tp)

        deadline = time.monotonic() + PROBE_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            take(200)
            # A partition is answered once it gave a record or a fetch response came back for it (its high watermark
            # is known): an idle member's look takes one fetch round, not the whole timeout.
            if all(tp in found or probe.highwater(tp) is not None for tp in positions):
                take(0)  # what that last response carried
                return found
        raise KafkaTimeoutError(f"no fetch response for {sorted(set(positions) - set(found))} within the probe's time")
    finally:
        probe.close()


def known_partitions(consumer: Any, topic: str) -> set[int]:
    """``topic``'s partitions as ``consumer``'s metadata knows them now, without waiting for the broker.

    `KafkaConsumer.partitions_for_topic` fetches the metadata of every topic when the cached one lacks ``topic`` and
    waits for it with no timeout (kafka-python 3.0): a member that asked while the broker's metadata was broken (an
    outage of tansu's S3 storage answers topic metadata with UnknownError) could wait forever, silently. Here an
    unknown topic asks for a metadata update, which the next polls carry, and answers an empty set (ask again later).
    """
    cluster = getattr(consumer, "_cluster", None)
    if cluster is None or not hasattr(cluster, "request_update"):  # another client layout: the public call
        return set(consumer.partitions_for_topic(topic) or ())
    partitions = cluster.partitions_for_topic(topic)
    if partitions is None:
        cluster.request_update()
        return set()
    return set(partitions)


class _AssignmentWatch(ConsumerRebalanceListener):
    """Notes when a completed rebalance left the member without partitions (the start of its idle time)."""

    def __init__(self, owner: BufferConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner._unassigned_since = None

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner._unassigned_since = None if assigned else time.monotonic()
        self.owner._quiet_since = time.monotonic()  # a new assignment starts fetching afresh
        if assigned:
            self.owner._idle_rejoins = 0


def _event_dead_letter(
    b: BufferedEvent, topic: str, reason: Reason, headers: dict[str, str] | None = None
) -> DeadLetter:
    """A dead-letter record for a decoded event (its canonical bytes) when the original record is not at hand."""
    return DeadLetter(
        topic,
        b.partition if b.partition is not None else -1,
        b.offset if b.offset is not None else -1,
        b.event.user_id.encode(),
        encode_event(b.event),
        (reason,),
        headers or {},
    )


def main(
    kafka: KafkaSettings | None = None,
    consumer: ConsumerSettings | None = None,
    database: DatabaseSettings | None = None,
    events: EventSettings | None = None,
) -> None:
    """Process entry point: run one consumer until SIGTERM/SIGINT, then finish the batch in hand and leave."""
    from prometheus_client import start_http_server

    cfg = consumer or ConsumerSettings()
    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
    bc = BufferConsumer(kafka, cfg, database, events)

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch, then leaving the group", signum)
        bc.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # SIGUSR1: every thread's Python stack to stderr (the log), for a member that is alive but makes no progress.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("consuming %s as group %s into %s", bc.kafka.topic_events, cfg.group_id, db.redact(bc.database.url))
    bc.run()
    t = bc.totals
    log.info(
        "stopped: %d records, %d inserted, %d duplicates, %d dead-lettered",
        t.records,
        t.inserted,
        t.duplicates,
        t.dead_lettered,
    )
