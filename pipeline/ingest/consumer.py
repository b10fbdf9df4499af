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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata, TopicPartition

from pipeline.config import ConsumerSettings, DatabaseSettings, EventSettings, KafkaSettings
from pipeline.domain.events import EventLimits, Reason, Rejected, split_of
from pipeline.ingest.codec import decode_record, dlq_headers, encode_event
from pipeline.observability import metrics
from pipeline.storage import db
from pipeline.storage.buffers import BufferedEvent, PendingWrite, WriteResult, begin_write, write_events

log = logging.getLogger(__name__)

# Errors after which the same transaction may succeed on a new connection.
_TRANSIENT = (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


#: A record to dead-letter (a Kafka ConsumerRecord, or a `_RecordRef` of a row the database refused) and why.
Invalid = tuple[Any, tuple[Reason, ...]]


@dataclass
class BatchStats:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0


@dataclass
class _Batch:
    """One poll result, decoded: what to write, what to dead-letter, which offsets to commit after."""

    started: float
    records: int = 0
    valid: list[BufferedEvent] = field(default_factory=list)
    invalid: list[Invalid] = field(default_factory=list)
    offsets: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)
    pending: PendingWrite | None = None


class BufferConsumer:
    """One member of the buffer consumer group. ``run`` loops until ``stop()`` (or SIGTERM via ``main``)."""

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
        self.first_record_at: float | None = None  # monotonic time of the first record ``run`` received
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._consumer = KafkaConsumer(
            self.kafka.topic_events,
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
        self._dlq = KafkaProducer(
            bootstrap_servers=self.kafka.servers, acks="all", retries=5, client_id="persona-buffer-dlq"
        )

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
            while not self._stop.is_set():
                records = self._consumer.poll(timeout_ms=self.cfg.poll_timeout_ms)
                batch = self._prepare(records) if records else None
                if in_flight is not None:
                    stats = self._finish(in_flight, *self._end_write(in_flight))
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
                self._begin_write(batch)
                in_flight = batch
            if in_flight is not None:  # stopping: finish the batch in hand (its records were read)
                self._finish(in_flight, *self._end_write(in_flight))
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        finally:
            self._dlq.close(timeout=10)
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- one batch ---
    def process(self, records: dict[TopicPartition, list]) -> BatchStats:
        """Handle one poll result in the documented order, without pipelining; returns what it did."""
        batch = self._prepare(records)
        return self._finish(batch, *self._write(batch.valid))

    def _prepare(self, records: dict[TopicPartition, list]) -> _Batch:
        """Step 1: decode and validate; note the offsets to commit."""
        batch = _Batch(started=time.perf_counter())
        for tp, recs in records.items():
            for rec in recs:
                result = decode_record(rec.value, rec.key, self.limits)
                if isinstance(result, Rejected):
                    batch.invalid.append((rec, result.reasons))
                else:
                    split = split_of(result.user_id, result.event_id, self.holdout_fraction)
                    batch.valid.append(BufferedEvent(result, split, tp.partition, rec.offset))
            if recs:
                batch.records += len(recs)
                batch.offsets[tp] = OffsetAndMetadata(recs[-1].offset + 1, "", -1)
        return batch

    def _finish(self, batch: _Batch, written: WriteResult, db_refused: list[Invalid]) -> BatchStats:
        """Steps 2 and 4 (step 3, the DB write, is done): dead-letter, then commit offsets; count."""
        invalid = batch.invalid + db_refused
        self._dead_letter(invalid)  # before the offsets move past them
        if self.cfg.failpoint == "after_db_commit":
            log.warning("failpoint after_db_commit: killing this process before the offset commit")
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            self._consumer.commit(batch.offsets)
            metrics.BUFFER_LAST_COMMIT.set_to_current_time()
        except CommitFailedError as e:
            # The group rebalanced: the new owner re-reads these records and the DB skips them as duplicates.
            log.warning("offset commit failed after a rebalance; records will be redelivered: %s", e)

        stats = BatchStats(batch.records, written.inserted, written.duplicates, len(invalid))
        for kind, n in written.inserted_by_kind.items():
            metrics.BUFFER_EVENTS.labels(kind).inc(n)
        metrics.BUFFER_DUPLICATES.inc(written.duplicates)
        metrics.BUFFER_BATCH_RECORDS.observe(stats.records)
        metrics.BUFFER_BATCH_SECONDS.observe(time.perf_counter() - batch.started)
        self.totals.records += stats.records
        self.totals.inserted += stats.inserted
        self.totals.duplicates += stats.duplicates
        self.totals.dead_lettered += stats.dead_lettered
        return stats

    def _begin_write(self, batch: _Batch) -> None:
        """Send the batch's transaction without waiting; on any trouble leave it to the synchronous path."""
        if not batch.valid:
            return
        try:
            batch.pending = begin_write(self._connection(), batch.valid)
        except psycopg.Error as e:
            log.warning("could not start the batch's transaction (%s); it will be written synchronously", e)
            self._drop_connection()

    def _end_write(self, batch: _Batch) -> tuple[WriteResult, list[Invalid]]:
        if batch.pending is not None:
            try:
                return batch.pending.result(), []
            except psycopg.Error as e:
                # Rolled back (or the connection died): write it again, with retries; it is idempotent.
                log.warning("the batch's transaction failed (%s); writing it again", e)
                self._drop_connection()
        return self._write(batch.valid)

    def _dead_letter(self, invalid: list[Invalid]) -> None:
        if not invalid:
            return
        futures = []
        for rec, reasons in invalid:
            source = f"{rec.topic}/{rec.partition}/{rec.offset}"
            futures.append(
                self._dlq.send(
                    self.kafka.topic_dlq,
                    key=rec.key,
                    value=rec.value,
                    headers=dlq_headers(reasons, source),
                )
            )
            metrics.BUFFER_REJECTED.labels(reasons[0].code if reasons else "unknown").inc()
            log.info("dead-lettered %s: %s", source, "; ".join(f"{r.field}:{r.code}" for r in reasons))
        self._dlq.flush(timeout=30)
        for f in futures:
            # An unacknowledged DLQ write must stop the batch: committing offsets would lose the record.
            f.get(timeout=30)

    def _write(self, batch: list[BufferedEvent]) -> tuple[WriteResult, list[Invalid]]:
        """Write the batch in one transaction, retrying transient errors; isolate rows the DB refuses."""
        delay = 0.5
        while True:
            conn = self._connection()
            try:
                with conn.transaction():
                    return write_events(conn, batch), []
            except _TRANSIENT as e:
                if self._stop.is_set():
                    raise
                metrics.BUFFER_DB_RETRIES.inc()
                log.warning("database error, retrying the batch in %.1fs: %s", delay, e)
                self._drop_connection()
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except psycopg.Error as e:
                log.error("the database refused the batch (%s); writing its events one by one", e)
                return self._write_one_by_one(batch)

    def _write_one_by_one(self, batch: list[BufferedEvent]) -> tuple[WriteResult, list[Invalid]]:
        conn = self._connection()
        inserted, duplicates, by_kind = 0, 0, dict[str, int]()
        refused: list[Invalid] = []
        with conn.transaction():
            for b in batch:
                try:
                    with conn.transaction():  # a savepoint per event
                        r = write_events(conn, [b])
                except psycopg.Error as e:
                    refused.append(
                        (
                            _RecordRef(b, self.kafka.topic_events),
                            (Reason("", "db_rejected", f"the database refused it: {e}"),),
                        )
                    )
                    continue
                inserted += r.inserted
                duplicates += r.duplicates
                for k, n in r.inserted_by_kind.items():
                    by_kind[k] = by_kind.get(k, 0) + n
        return WriteResult(inserted, duplicates, by_kind), refused

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database, autocommit=True)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class _RecordRef:
    """Enough of a Kafka record to dead-letter a valid-looking event that the database refused."""

    def __init__(self, b: BufferedEvent, topic: str) -> None:
        self.topic = topic
        self.partition = b.partition
        self.offset = b.offset
        self.key = b.event.user_id.encode()
        self.value = encode_event(b.event)


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
