"""The buffer consumer's guards against a Kafka client that stops making progress: `Stall` (one report per stall,
none while the loop moves, none when disabled), `known_partitions` (the topic's partitions without waiting for the
broker) and `Lost` (when a coordinator unknown for long enough calls for a new client)."""

from __future__ import annotations

import threading
import time

from pipeline.ingest.consumer import Stall


def test_one_report_per_stall_and_none_while_the_loop_moves() -> None:
    reports: list[tuple[str, float]] = []
    got = threading.Event()

    def report(what: str, seconds: float) -> None:
        reports.append((what, seconds))
        got.set()

    with Stall(0.3, report, check_s=0.02) as stall:
        for _ in range(20):  # a loop that keeps coming back: no report
            stall.touch("kafka poll")
            time.sleep(0.03)
        assert reports == []
        stall.touch("kafka commit")  # then one call that does not come back
        assert got.wait(2.0)
        time.sleep(0.3)  # still stuck: not reported again
        assert [w for w, _ in reports] == ["kafka commit"] and reports[0][1] >= 0.3
        got.clear()
        stall.touch("database write")  # it came back, and the next call hangs too: a second report
        assert got.wait(2.0)
    assert [w for w, _ in reports] == ["kafka commit", "database write"]


def test_no_thread_when_disabled() -> None:
    before = threading.active_count()
    with Stall(0, lambda *_: None) as stall:
        stall.touch("kafka poll")
        assert threading.active_count() == before


class _Cluster:
    def __init__(self, partitions: set[int] | None) -> None:
        self.partitions, self.updates = partitions, 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions

    def request_update(self) -> object:
        self.updates += 1
        return object()


class _Consumer:
    """Only what `known_partitions` may touch; the blocking public lookup fails the test."""

    def __init__(self, cluster: _Cluster) -> None:
        self._cluster = cluster

    def partitions_for_topic(self, topic: str) -> set[int]:
        raise AssertionError("KafkaConsumer.partitions_for_topic waits for the broker with no timeout")


def test_known_partitions_never_waits_for_the_broker() -> None:
    from pipeline.ingest.consumer import known_partitions

    unknown = _Cluster(None)
    assert known_partitions(_Consumer(unknown), "t") == set() and unknown.updates == 1
    known = _Cluster({0, 1, 2})
    assert known_partitions(_Consumer(known), "t") == {0, 1, 2} and known.updates == 0


def test_lost_after_the_limit_without_a_break_then_the_clock_starts_again() -> None:
    from pipeline.ingest.consumer import Lost

    watch = Lost(20.0)
    assert not watch.lost(True, 100.0)  # first seen unknown
    assert not watch.lost(True, 119.0)
    assert not watch.lost(False, 119.5)  # found again: the clock stops
    assert not watch.lost(True, 120.0)
    assert not watch.lost(True, 139.9)
    assert watch.lost(True, 140.0)  # 20 s without a break
    assert not watch.lost(True, 141.0)  # a new client: counted from here
    assert watch.lost(True, 161.0)
    assert not Lost(0).lost(True, 0.0) and not Lost(0).lost(True, 1e9)
