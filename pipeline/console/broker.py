"""What the pipeline page reads from Kafka: the dead-letter topic (records read, by code, the latest reasons) and the
buffer consumer group's committed offsets. Read at most every ``CACHE_S`` seconds, with a bounded read, so the page
stays fast; an unreachable broker is shown as such, never raised.

The consumer lag is counted, not asked: the embedded broker (tansu) answers end offsets wrongly (DESIGN §4), so the
records after each partition's committed offset are read (bounded like the dead letters: a lag past the bound is shown
as "at least"). On Apache Kafka the same count is what end offset - committed offset would say.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson

from pipeline.config import Settings

CACHE_S = 15.0
MAX_RECORDS = 20_000
READ_S = 3.0

_lock = threading.Lock()
_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def snapshot(settings: Settings) -> dict[str, Any]:
    """The broker's part of the pipeline page (cached ``CACHE_S`` seconds per broker and topics)."""
    key = f"{settings.kafka.bootstrap_servers}|{settings.kafka.topic_dlq}|{settings.kafka.topic_events}"
    with _lock:
        hit = _cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
        try:
            value = _read(settings)
        except Exception as e:  # the page shows the broker as unreachable, with why
            value = {"error": f"{type(e).__name__}: {e}"}
        _cache[key] = (time.monotonic(), value)
        return value


def _header(headers: list[tuple[str, bytes]] | None, name: str) -> str:
    for k, v in headers or []:
        if k == name:
            return v.decode(errors="replace")
    return ""


def _read(settings: Settings) -> dict[str, Any]:
    from kafka import KafkaConsumer, TopicPartition

    kafka = settings.kafka
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.servers,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=kafka.request_timeout_ms,
        client_id="persona-console",
        consumer_timeout_ms=int(READ_S * 1000),
    )
    try:
        parts = consumer.partitions_for_topic(kafka.topic_dlq) or set()
        tps = [TopicPartition(kafka.topic_dlq, p) for p in sorted(parts)]
        by_code: dict[str, int] = {}
        latest: list[dict[str, Any]] = []
        n = 0
        complete = True
        if tps:
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            records, complete = _read_to_end(consumer, tps)
            for rec in records:
                n += 1
                code = _header(rec.headers, "persona.dlq.code") or "unknown"
                by_code[code] = by_code.get(code, 0) + 1
                try:
                    reasons = orjson.loads(_header(rec.headers, "persona.dlq.reasons") or "[]")
                except orjson.JSONDecodeError:
                    reasons = []
                latest.append(
                    {
                        "at": _header(rec.headers, "persona.dlq.at"),
                        "code": code,
                        "reasons": "; ".join(
                            f"{r.get('field', '?')}: {r.get('message', '')}" for r in reasons if isinstance(r, dict)
                        ),
                        "where": f"{rec.partition}:{rec.offset}",
                    }
                )
                latest = latest[-10:]
        committed, lag_complete = _lag(settings, TopicPartition)
        return {
            "dlq_read": n,
            "dlq_complete": complete,
            "dlq_by_code": sorted(by_code.items(), key=lambda kv: -kv[1]),
            "dlq_latest": list(reversed(latest)),
            "committed": committed,
            "lag": sum(behind for _, _, behind in committed),
            "lag_complete": lag_complete,
            "error": None,
        }
    finally:
        consumer.close()


def _read_to_end(consumer: Any, tps: list[Any]) -> tuple[list[Any], bool]:
    """The records of the assigned partitions from their positions on, and whether they were read to the end (within
    ``READ_S`` and ``MAX_RECORDS``). The end: a poll that brings nothing once every partition has had a fetch answered
    (its high watermark is known), or three empty polls in a row where the broker reports none; an empty first poll
    alone means nothing (the fetches may still be under way, more so on a busy machine)."""
    records: list[Any] = []
    empty = 0
    deadline = time.monotonic() + READ_S
    while time.monotonic() < deadline and len(records) < MAX_RECORDS:
        got = consumer.poll(timeout_ms=300, max_records=2000)
        if got:
            empty = 0
            for batch in got.values():
                records.extend(batch)
            continue
        empty += 1
        if empty >= 3 or all(consumer.highwater(tp) is not None for tp in tps):
            return records, True
    return records, False


def _lag(settings: Settings, topic_partition: Any) -> tuple[list[tuple[int, int | None, int]], bool]:
    """(partition, committed offset of the buffer consumer group, records after it) on the events topic, and whether
    every partition was read to its end (within ``READ_S`` and ``MAX_RECORDS``)."""
    from kafka import KafkaConsumer

    kafka = settings.kafka
    group = KafkaConsumer(
        bootstrap_servers=kafka.servers,
        group_id=settings.consumer.group_id,
        enable_auto_commit=False,
        request_timeout_ms=kafka.request_timeout_ms,
        client_id="persona-console-offsets",
    )
    try:
        parts = sorted(group.partitions_for_topic(kafka.topic_events) or set())
        tps = [topic_partition(kafka.topic_events, p) for p in parts]
        committed = {tp: group.committed(tp) for tp in tps}
    finally:
        group.close()
    behind = dict.fromkeys(tps, 0)
    complete = True
    if tps:
        reader = KafkaConsumer(
            bootstrap_servers=kafka.servers,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=kafka.request_timeout_ms,
            client_id="persona-console-lag",
        )
        try:
            reader.assign(tps)
            for tp in tps:  # a group that never committed a partition starts it from the beginning
                offset = committed[tp]
                if offset is None:
                    reader.seek_to_beginning(tp)
                else:
                    reader.seek(tp, offset)
            records, complete = _read_to_end(reader, tps)
            for rec in records:
                behind[topic_partition(rec.topic, rec.partition)] += 1
        finally:
            reader.close()
    return [(tp.partition, committed[tp], behind[tp]) for tp in tps], complete


def queue_depths(settings: Settings) -> dict[str, Any]:
    """Tasks waiting in each Celery queue (Redis list lengths), or the error that kept them unread."""
    import redis

    from pipeline.domain.tasks import QUEUES

    try:
        client = redis.Redis.from_url(settings.redis.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {"depths": [(q, int(client.llen(q))) for q in QUEUES], "error": None}
        finally:
            client.close()
    except redis.RedisError as e:
        return {"depths": [], "error": f"{type(e).__name__}: {e}"}
