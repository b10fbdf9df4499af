"""`pipeline.ingest.consumer.Stall`, the buffer consumer's watchdog: one report per stall, none while touched, none
when disabled."""

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
