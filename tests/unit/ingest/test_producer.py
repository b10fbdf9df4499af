"""The producer SDK's broker client without a broker: clear errors, fast, never a hang or a crash."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.config import KafkaSettings
from pipeline.ingest.producer import EventProducer, ProducerError


def _nowhere() -> KafkaSettings:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000)


def test_the_sdk_says_when_the_broker_does_not_answer():
    started = time.monotonic()
    with pytest.raises(ProducerError, match="cannot reach Kafka"):
        EventProducer(_nowhere())
    assert time.monotonic() - started < 30


def test_the_api_client_starts_without_a_broker_and_fails_fast_between_attempts():
    producer = EventProducer(_nowhere(), connect=False, rebuild_interval_s=60, max_block_s=1)
    event = ...  # never sent: the client is not built
    with pytest.raises(ProducerError) as first:
        producer.produce_valid([(0, event)], timeout_s=1)  # type: ignore[list-item]
    deadline = time.monotonic() + 10
    while producer.last_error is None and time.monotonic() < deadline:  # the build, in its thread, gives up
        time.sleep(0.05)
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(ProducerError, match="next attempt in") as second:
        producer.produce_valid([(0, event)], timeout_s=1)  # type: ignore[list-item]
    assert time.monotonic() - started < 0.5  # no new attempt within rebuild_interval_s
    assert first.value.retry_after_s >= 1 and second.value.retry_after_s > 50
    producer.close()
