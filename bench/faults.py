"""Fault benchmark: events keep arriving through the ingest API while the pipeline's parts fail, one after another.

A stack of its own (private ports, data under /tmp; stopped at the end) runs every `persona` process: the ingest
API, the buffer consumer, the scheduler, a training worker (queue `train`) and a gate worker (queue `evaluate`), with
the tiny random base model. Client threads post events through ``POST /v1/events`` at a steady rate, each retrying
a request with the same body (event_id makes it idempotent) on 503, 5xx and connection errors until it gets 202, as
a well-behaved client does. Meanwhile, one after the other:

  a. SIGKILL of the buffer consumer (3 times), restarted at once as a supervisor would;
  b. SIGKILL of the Kafka broker (tansu), started again after ``--down-s``;
  c. a restart of the stack's own PostgreSQL (fast shutdown, ``--down-s`` down, start);
  d. the S3 server (SeaweedFS) stopped while a trained candidate waits to be gated, started again after ``--down-s``;
  e. SIGKILL of the training worker mid-training, restarted at once.

Only the killed process is started again (and the stopped service); everything else must recover by its own code.
When a process dies anyway, or the pipeline does not flow again within ``--recovery-timeout-s``, the recovery is
"never" and the harness repairs what it can (restarts the dead or stuck process, said in the notes) so that the
next fault is still measured.

Per fault: events acknowledged (202) while it ran, how many of them are buffered (rows in `events`) at the end,
lost (acknowledged, not buffered), duplicated (rows per event_id > 1; the counters of `user_state` are checked
against the rows for every user at the end), and the seconds from the moment the dependency was back until the
pipeline flowed again without help: a fresh probe event posted then is buffered (a, b, c), the candidate is
promoted and its pointer published and a probe event buffered (d: tansu keeps its log in that S3 server), the
interrupted training completes (e; counted from the moment the restarted worker is ready: its Python start is no
property of the pipeline). Goal: 0 lost, 0 duplicated, recovery
<= 30 s. Dead-lettered records are counted at the end.

    .venv/bin/python bench/faults.py              # 20,000+ events, all faults (~6 minutes): bench/results/faults.md
    .venv/bin/python bench/faults.py --quick      # 2,000+ events, one consumer kill (~2 minutes; the CI test
                                                  # tests/integration/test_faults.py runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
from kafka import KafkaConsumer

from pipeline import stack
from pipeline.config import (
    ROOT,
    DatabaseSettings,
    KafkaSettings,
    RedisSettings,
    S3Settings,
    Settings,
    StackSettings,
    child_env,
)
from pipeline.demo import sim
from pipeline.stack.databases import PostgresService
from pipeline.stack.process import terminate, wait_gone
from pipeline.stack.state import load_state
from pipeline.storage import apps, db
from pipeline.storage.objects import ObjectStore

RESULTS = Path(__file__).parent / "results"
APP = "faults-app"
GOAL_S = 30.0
FAULTS = ("a", "b", "c", "d", "e")
LABELS = {
    "a": "consumer SIGKILL",
    "b": "Kafka broker SIGKILL + restart",
    "c": "PostgreSQL restart",
    "d": "S3 down during a promotion",
    "e": "training worker SIGKILL mid-training",
}
#: Gating rules of the run: the default ones without the drift bound, which the tiny random model's long trainings
#: (needed to kill one mid-way) may cross; the gate's decision is not what is measured here.
RULES = """version: 1
default_on_missing: reject
rules:
  - {name: enough_holdout, kind: min_evidence, evidence: holdout_events, min: 3}
  - {name: holdout_improves, kind: improvement, metric: holdout_nll, reference: current_or_base, min_relative: 0.01}
"""
#: Events a user needs to be due (the fault users get more at once; the load users never reach it).
DUE_EVENTS = 60


@dataclass
class Options:
    events: int = 20_000
    rate: float = 100.0  # events per second, all clients together
    clients: int = 4
    batch: int = 20  # events per request
    faults: str = "abcde"
    consumer_kills: int = 3
    down_s: float = 8.0
    recovery_timeout_s: float = 90.0
    train_steps: int = 150  # long enough on the tiny model (~10 s here) to kill a worker mid-training
    data_dir: Path | None = None
    kafka_storage: str | None = None  # None: the StackSettings default
    kafka_port: int = 29092
    s3_port: int = 28333
    pg_port: int = 55499
    redis_port: int = 56399
    ingest_port: int = 28080
    keep: bool = False
    env: dict[str, str] = field(default_factory=dict)  # extra PERSONA_* of the processes


@dataclass
class Phase:
    """One fault (or the calm before and after): its window, recovery and what happened."""

    key: str
    label: str
    started: float
    ended: float | None = None
    recovery_s: float | None = None
    recovery_what: str = ""
    notes: list[str] = field(default_factory=list)
    acked: int = 0
    buffered: int = 0
    lost: int = 0
    duplicated: int = 0
    client_retries: Counter = field(default_factory=Counter)


def now() -> float:
    return time.monotonic()


def wait_until(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> float | None:
    """Seconds until ``cond()`` held, or None after ``timeout_s`` (exceptions count as not yet)."""
    t0 = now()
    while True:
        try:
            if cond():
                return now() - t0
        except Exception:  # a dependency being down is what is measured
            pass
        if now() - t0 > timeout_s:
            return None
        time.sleep(interval_s)


# --- the `persona` processes --------------------------------------------------------------------------------------
class Procs:
    """The pipeline's processes, each a `persona` command with a log; kill, restart and health by name."""

    ARGS: ClassVar[dict[str, list[str]]] = {
        "ingest": ["ingest", "serve"],
        "consumer": ["consume"],
        "beat": ["beat", "--metrics-port", "0"],
        "worker-train": ["worker", "--queues", "train", "--name", "faults-train@%h"],
        "worker-eval": ["worker", "--queues", "evaluate", "--name", "faults-eval@%h"],
    }

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.expected_down: set[str] = set()

    def log(self, name: str) -> Path:
        return self.logs / f"faults-{name}.log"

    def start(self, name: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as out:
            out.write(f"\n--- {datetime.now(UTC).isoformat()} persona {' '.join(self.ARGS[name])}\n".encode())
            out.flush()
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", *self.ARGS[name]],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.expected_down.discard(name)

    def send(self, name: str, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        self.expected_down.add(name)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def send_signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to a running process (nothing if it is not running)."""
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)

    def dead(self) -> dict[str, int]:
        """Processes that exited without being killed here: name -> exit code."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None and n not in self.expected_down}

    def why(self, name: str, lines: int = 3) -> str:
        """The last error-looking lines of a process's log (its exception, usually)."""
        text = self.log(name).read_text(errors="replace").splitlines()[-200:]
        hits = [ln.strip() for ln in text if any(w in ln for w in ("Error", "Exception", "Traceback", "error"))]
        return " | ".join(hits[-lines:])[:600] or " | ".join(text[-lines:])[:600]

    def first_line_time(self, name: str, offset: int, needle: str) -> datetime | None:
        """The local time stamped on the first log line after ``offset`` that contains ``needle``."""
        with self.log(name).open("rb") as fh:
            fh.seek(offset)
            for line in fh.read().decode(errors="replace").splitlines():
                if needle in line:
                    with contextlib.suppress(ValueError):
                        return datetime.fromisoformat(line.split(" ", 1)[0])
        return None

    def stop_all(self) -> None:
        for name in list(self.procs):
            if self.alive(name):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.procs[name].pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


# --- the clients --------------------------------------------------------------------------------------------------
class Load:
    """Client threads posting batches at a steady rate; each batch is retried as is until 202."""

    def __init__(self, url: str, key: str, opts: Options, phase: Callable[[], Phase], tag: str) -> None:
        self.url, self.key, self.opts, self.phase = url, key, opts, phase
        self.users = [sim.SimUser(f"load-{tag}-{i:04d}", s.style) for i, s in enumerate(sim.users(self._n_users()))]
        self.lock = threading.Lock()
        self.next_batch = itertools.count()
        self.acked: dict[str, str] = {}  # event_id -> key of the phase it was acknowledged in
        self.sent_batches = 0
        self.unacked = 0  # events of requests given up at the end
        self.stop_sending = threading.Event()  # set when the faults are done: stop once `events` are acked
        self.abort = threading.Event()
        self.threads: list[threading.Thread] = []
        self.t0 = now()

    def _n_users(self) -> int:
        # At most ~20 events per load user in a run of up to 15 minutes: below DUE_EVENTS, so that only the fault
        # users are trained (and the training worker is free for them).
        return max(50, int(max(self.opts.events, self.opts.rate * 900)) // 20)

    def _batch(self, i: int) -> list[dict[str, Any]]:
        rng = random.Random(i)
        out = []
        for j in range(self.opts.batch):
            user = self.users[(i * self.opts.batch + j) % len(self.users)]
            prompt, text = user.message(rng)
            out.append(
                {
                    "event_id": str(uuid.uuid4()),
                    "user_id": user.user_id,
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "kind": "message",
                    "app": APP,
                    "prompt": prompt,
                    "text": text,
                }
            )
        return out

    def start(self) -> None:
        self.t0 = now()
        for k in range(self.opts.clients):
            t = threading.Thread(target=self._client, name=f"client-{k}", daemon=True)
            t.start()
            self.threads.append(t)

    def _client(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as http:
            while not self.abort.is_set():
                i = next(self.next_batch)
                if self.stop_sending.is_set() and len(self.acked) >= self.opts.events:
                    return
                due = self.t0 + i * self.opts.batch / self.opts.rate
                if due > now():
                    time.sleep(due - now())
                batch = self._batch(i)
                try:
                    ok = post_until_acked(http, self.url, batch, self.abort, self.phase)
                except RuntimeError as e:  # a 4xx: a bug of this script or of the API, not a fault to ride out
                    print(f"client stopped: {e}", flush=True)
                    ok = False
                if not ok:
                    with self.lock:
                        self.unacked += len(batch)
                    return
                with self.lock:
                    key = self.phase().key
                    for ev in batch:
                        self.acked[ev["event_id"]] = key
                    self.sent_batches += 1

    def finish(self, timeout_s: float) -> None:
        """Stop once ``events`` are acknowledged (or ``timeout_s`` passed: requests in hand are given up)."""
        self.stop_sending.set()
        deadline = now() + timeout_s
        for t in self.threads:
            t.join(max(0.1, deadline - now()))
        self.abort.set()
        for t in self.threads:
            t.join(35)


def post_until_acked(
    http: httpx.Client,
    url: str,
    batch: list[dict[str, Any]],
    abort: threading.Event,
    phase: Callable[[], Phase] | None = None,
    deadline: float | None = None,
) -> bool:
    """POST the same body until 202 (True), ``abort`` or ``deadline`` (False); retries are counted per phase."""
    delay = 0.25
    while not abort.is_set() and (deadline is None or now() < deadline):
        try:
            r = http.post(f"{url}/v1/events", json=batch)
            if r.status_code == 202:
                return True
            what = str(r.status_code)
            if r.status_code < 500:
                raise RuntimeError(f"POST /v1/events answered {r.status_code}: {r.text[:300]}")
        except httpx.HTTPError as e:
            what = type(e).__name__
        if phase is not None:
            phase().client_retries[what] += 1
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    return False


# --- the run ------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tag = datetime.now(UTC).strftime("%H%M%S")
        self.data_dir = opts.data_dir or Path(f"/tmp/persona-faults-{self.tag}")
        own = StackSettings(
            data_dir=self.data_dir,
            postgres="embedded",
            redis="embedded",
            embedded_postgres_port=opts.pg_port,
            embedded_redis_port=opts.redis_port,
        )
        if opts.kafka_storage:
            own = own.model_copy(update={"kafka_storage": opts.kafka_storage})
        parts: list[Any] = [
            own,
            KafkaSettings(bootstrap_servers=f"127.0.0.1:{opts.kafka_port}"),
            S3Settings(endpoint=f"127.0.0.1:{opts.s3_port}"),
            DatabaseSettings(url=f"postgresql://postgres@127.0.0.1:{opts.pg_port}/persona"),
            RedisSettings(url=f"redis://127.0.0.1:{opts.redis_port}/0"),
        ]
        self.settings = Settings(*parts)
        self.phases: list[Phase] = []
        self.procs: Procs | None = None
        self.load: Load | None = None
        self.url = f"http://127.0.0.1:{opts.ingest_port}"
        self.db_url = ""
        self.key = ""
        self.t_start = now()

    # -- helpers --
    def say(self, msg: str) -> None:
        print(f"{now() - self.t_start:7.1f}s  {msg}", flush=True)

    def phase(self) -> Phase:
        return self.phases[-1]

    def begin(self, key: str, label: str) -> Phase:
        if self.phases and self.phases[-1].ended is None:
            self.phases[-1].ended = now()
        p = Phase(key, label, now())
        self.phases.append(p)
        self.say(f"== {label}")
        return p

    def sql(self, query: str, params: Any = None) -> list[tuple]:
        with psycopg.connect(self.db_url, connect_timeout=3, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def buffered(self, event_id: str) -> bool:
        return bool(self.sql("SELECT 1 FROM events WHERE event_id = %s", (event_id,)))

    def post_events(self, events: list[dict[str, Any]], timeout_s: float) -> bool:
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as http:
            return post_until_acked(http, self.url, events, threading.Event(), self.phase, now() + timeout_s)

    def probe(self, since: float, p: Phase | None = None) -> float | None:
        """Post a fresh event (retrying until 202) and wait until it is buffered: seconds from ``since``, or None.
        With ``p``, a slow or failed probe notes when (or whether) the API acknowledged it."""
        ev = {
            "event_id": str(uuid.uuid4()),
            "user_id": f"probe-{self.tag}",
            "occurred_at": datetime.now(UTC).isoformat(),
            "kind": "message",
            "app": APP,
            "text": "probe",
        }
        deadline = since + self.opts.recovery_timeout_s
        if not self.post_events([ev], deadline - now()):
            if p is not None:
                p.notes.append("probe never acknowledged by the ingest API")
            return None
        acked = now() - since
        took = wait_until(lambda: self.buffered(ev["event_id"]), max(0.0, deadline - now()), 0.1)
        if p is not None and (took is None or now() - since > GOAL_S):
            p.notes.append(f"probe acknowledged after {acked:.1f} s, buffered {'never' if took is None else 'then'}")
        return None if took is None else now() - since

    def service_pid(self, name: str) -> int:
        return load_state(self.data_dir).services[name].pid

    def stack_up(self) -> None:
        stack.up(self.settings)

    # -- setup --
    def setup(self) -> None:
        self.say(f"stack in {self.data_dir} (kafka storage: {self.settings.stack.kafka_storage})")
        if self.data_dir.exists() and self.opts.data_dir is None:
            shutil.rmtree(self.data_dir)
        self.stack_up()
        urls = stack.effective_urls(self.settings)
        self.db_url = urls["db_url"]
        db.migrate(self.settings.db.model_copy(update={"url": self.db_url}))
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            _, self.key = apps.create_key(conn, APP, "fault benchmark")
        rules = self.data_dir / "rules.yaml"
        rules.write_text(RULES)
        env = {
            "PERSONA_DB_URL": self.db_url,
            "PERSONA_REDIS_URL": urls["redis_url"],
            "PERSONA_KAFKA_BOOTSTRAP_SERVERS": urls["kafka_bootstrap_servers"],
            "PERSONA_S3_ENDPOINT": urls["s3_endpoint"],
            "PERSONA_STACK_DATA_DIR": str(self.data_dir),
            "PERSONA_STACK_POSTGRES": "embedded",
            "PERSONA_STACK_REDIS": "embedded",
            "PERSONA_STACK_EMBEDDED_POSTGRES_PORT": str(self.opts.pg_port),
            "PERSONA_STACK_EMBEDDED_REDIS_PORT": str(self.opts.redis_port),
            "PERSONA_STACK_KAFKA_STORAGE": self.settings.stack.kafka_storage,
            "PERSONA_INGEST_PORT": str(self.opts.ingest_port),
            "PERSONA_CONSUMER_METRICS_PORT": "0",
            "PERSONA_WORKER_METRICS_PORT": "0",
            "PERSONA_MODEL_BASE": "tiny-random",
            "PERSONA_GATE_RULES": str(rules),
            # The tiny random model learns a style only with a large learning rate (tests/integration/demo).
            "PERSONA_TRAIN_LEARNING_RATE": "0.05",
            "PERSONA_TRAIN_RANK": "4",
            "PERSONA_TRAIN_VAL_FRACTION": "0",
            "PERSONA_TRAIN_THREADS": "1",
            "PERSONA_TRAIN_MAX_STEPS": str(self.opts.train_steps),
            # Users with DUE_EVENTS new events are due at once; the load users never get that many.
            "PERSONA_POLICY_MIN_NEW_EVENTS": str(DUE_EVENTS),
            "PERSONA_POLICY_MAX_AGE_S": "86400",
            "PERSONA_POLICY_COOLDOWN_S": "0",
            "PERSONA_POLICY_TICK_S": "1",
            "PYTHONUNBUFFERED": "1",
            **self.opts.env,
        }
        self.procs = Procs(child_env(**env), self.data_dir / "logs")
        for name in Procs.ARGS:
            self.procs.start(name)
        ready = wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=2).is_success, 60)
        if ready is None:
            raise RuntimeError(f"the ingest API did not start; see {self.procs.log('ingest')}")
        self.say(f"processes up (logs in {self.data_dir / 'logs'}); ingest API {self.url}")

    # -- after each fault --
    def check_processes(self, p: Phase) -> None:
        """Note (and restart) every process that died by itself during the fault."""
        assert self.procs is not None
        for name, rc in self.procs.dead().items():
            why = self.procs.why(name)
            p.notes.append(f"{name} exited by itself (rc {rc}): {why}; restarted by the harness")
            self.say(f"   ! {name} exited (rc {rc}): {why}")
            self.procs.start(name)

    def repair(self, p: Phase) -> None:
        """The pipeline did not flow again by itself: restart what is stuck, so the next fault can be measured."""
        assert self.procs is not None
        self.check_processes(p)
        ev = {
            "event_id": str(uuid.uuid4()),
            "user_id": f"probe-{self.tag}",
            "occurred_at": datetime.now(UTC).isoformat(),
            "kind": "message",
            "app": APP,
            "text": "repair probe",
        }
        if not self.post_events([ev], 15):
            p.notes.append(
                f"ingest API did not acknowledge (still 503 or down): {self.procs.why('ingest')}; "
                "restarted by the harness"
            )
            self.say("   ! ingest API stuck; restarting it")
            self.procs.kill("ingest")
            self.procs.start("ingest")
            wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=2).is_success, 60)
            if not self.post_events([ev], 60):
                p.notes.append("ingest API still does not acknowledge after its restart")
                return
        if wait_until(lambda: self.buffered(ev["event_id"]), 20) is None:
            p.notes.append(f"consumer alive but not buffering: {self.procs.why('consumer')}; restarted by the harness")
            self.say("   ! consumer stuck; its threads' stacks go to its log (SIGUSR1), then it is restarted")
            self.procs.send_signal("consumer", signal.SIGUSR1)
            time.sleep(1.0)
            self.procs.kill("consumer")
            self.procs.start("consumer")
            if wait_until(lambda: self.buffered(ev["event_id"]), 60) is None:
                p.notes.append("still not buffering after the consumer's restart")

    def measure_flow(self, p: Phase, back: float) -> None:
        p.recovery_s = self.probe(back, p)
        p.recovery_what = "probe event buffered"
        self.say(f"   recovery: {fmt_recovery(p.recovery_s, self.opts.recovery_timeout_s)}")
        self.check_processes(p)
        if p.recovery_s is None:
            self.repair(p)

    def settle(self, timeout_s: float = 30.0) -> None:
        """Let the consumer catch up before the next fault (so that each fault starts from a calm pipeline)."""
        assert self.load is not None
        with self.load.lock:
            want = list(self.load.acked)
        if not want:
            return

        def caught_up() -> bool:
            rows = self.sql("SELECT count(*) FROM events WHERE event_id = ANY(%s)", (want,))
            return rows[0][0] >= len(want)

        wait_until(caught_up, timeout_s, 0.5)

    # -- the faults --
    def fault_a(self) -> None:
        assert self.procs is not None
        for k in range(1, self.opts.consumer_kills + 1):
            p = self.begin(f"a{k}", f"{LABELS['a']} #{k}")
            time.sleep(2.0)  # mid-stream: batches in hand
            self.procs.kill("consumer")
            self.procs.start("consumer")
            self.measure_flow(p, now())
            self.settle()

    def fault_b(self) -> None:
        p = self.begin("b", LABELS["b"])
        time.sleep(2.0)
        pid = self.service_pid("kafka")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        rec = load_state(self.data_dir).services["kafka"]
        wait_gone(rec, 10)
        time.sleep(self.opts.down_s)
        self.stack_up()
        self.say("   broker back")
        self.measure_flow(p, now())
        self.settle()

    def fault_c(self) -> None:
        p = self.begin("c", LABELS["c"])
        time.sleep(2.0)
        rec = load_state(self.data_dir).services["postgres"]
        PostgresService(self.settings).stop(rec)
        time.sleep(self.opts.down_s)
        self.stack_up()
        self.say("   PostgreSQL back")
        self.measure_flow(p, now())
        self.settle()

    def _fault_user(self, key: str) -> str:
        user = sim.SimUser(f"fault-{key}-{self.tag}", sim.users(1)[0].style)
        events = list(sim.events_for(user, DUE_EVENTS + 20, app=APP, seed=7))
        if not self.post_events(events, 120):
            raise RuntimeError(f"could not post the events of {user.user_id}")
        return user.user_id

    def _revisions(self, user_id: str) -> list[str]:
        return [r[0] for r in self.sql("SELECT revision_id FROM revisions WHERE user_id = %s", (user_id,))]

    def fault_d(self) -> None:
        assert self.procs is not None
        p = self.begin("d", LABELS["d"])
        # The gate worker is paused (SIGSTOP) while the user trains, so that the candidate's gate task waits for it;
        # S3 is stopped, the worker resumed (SIGCONT): its gate runs against a dead object store.
        eval_log = self.procs.log("worker-eval").stat().st_size
        self.procs.send("worker-eval", signal.SIGSTOP)
        try:
            user = self._fault_user("d")
            took = wait_until(lambda: bool(self._revisions(user)), self.opts.recovery_timeout_s, 0.1)
            if took is None:
                p.notes.append(f"{user} was not trained within {self.opts.recovery_timeout_s:.0f}s; not injected")
                return
            (cand,) = self._revisions(user)
            terminate(load_state(self.data_dir).services["s3"])  # SIGTERM, then SIGKILL after 10 s
            self.say(f"   S3 stopped; candidate {cand} of {user} goes to the gate")
        finally:
            self.procs.send("worker-eval", signal.SIGCONT)
        time.sleep(self.opts.down_s)
        self.stack_up()
        back = now()
        self.say("   S3 back")
        flow: list[float | None] = []
        prober = threading.Thread(target=lambda: flow.append(self.probe(back, p)), daemon=True)
        prober.start()
        store = ObjectStore(self.settings.s3)

        def decided() -> list[tuple]:
            return self.sql("SELECT outcome, reason FROM decisions WHERE revision_id = %s", (cand,))

        def done() -> bool:
            d = decided()
            if d and d[0][0] != "promoted":
                return True  # rejected or stale: decided, and nothing to promote
            rows = self.sql("SELECT revision_id FROM aliases WHERE user_id = %s AND alias = 'production'", (user,))
            pointer = store.read_pointer(user) if rows and rows[0][0] == cand else None
            return pointer is not None and pointer.get("revision") == cand

        took = wait_until(done, self.opts.recovery_timeout_s, 0.2)
        p.recovery_s = None if took is None else now() - back
        p.recovery_what = "candidate promoted and its pointer published"
        outcome = decided()
        p.notes.append(f"gate: {outcome[0][0]} ({outcome[0][1]})" if outcome else "no gate decision")
        with self.procs.log("worker-eval").open("rb") as fh:
            fh.seek(eval_log)
            text = fh.read().decode(errors="replace")
        retried = [ln.split("retry:", 1)[1].strip()[:160] for ln in text.splitlines() if " retry: " in ln]
        p.notes.append(f"gate task retried {len(retried)} time(s)" + (f", first: {retried[0]}" if retried else ""))
        prober.join()
        p.notes.append(f"promotion after S3 back: {fmt_recovery(p.recovery_s, self.opts.recovery_timeout_s)}")
        p.notes.append(f"ingest probe after S3 back: {fmt_recovery(flow[0], self.opts.recovery_timeout_s)}")
        # tansu keeps its log in the same S3 server: the events' flow is part of this fault's recovery too.
        p.recovery_s = None if p.recovery_s is None or flow[0] is None else max(p.recovery_s, flow[0])
        p.recovery_what = "candidate promoted and its pointer published, and a probe event buffered"
        self.say(f"   recovery: {fmt_recovery(p.recovery_s, self.opts.recovery_timeout_s)}; {'; '.join(p.notes)}")
        self.check_processes(p)
        if flow[0] is None:
            self.repair(p)
        self.settle()

    def fault_e(self) -> None:
        assert self.procs is not None
        p = self.begin("e", LABELS["e"])
        user = self._fault_user("e")

        def leased() -> str | None:
            rows = self.sql(
                "SELECT lease_revision_id FROM user_state WHERE user_id = %s AND lease_expires_at > now()", (user,)
            )
            return rows[0][0] if rows and rows[0][0] else None

        if wait_until(lambda: leased() is not None, self.opts.recovery_timeout_s, 0.1) is None:
            p.notes.append(f"{user} was not trained within {self.opts.recovery_timeout_s:.0f}s; fault not injected")
            return
        planned = leased()
        time.sleep(2.0)
        self.procs.kill("worker-train")
        if self._revisions(user):
            p.notes.append("the training had already finished when the worker was killed (raise --train-steps)")
        offset = self.procs.log("worker-train").stat().st_size
        wall = datetime.now()
        self.procs.start("worker-train")
        killed = now()
        self.say(f"   worker killed while training {planned} of {user}; restarted")
        # The worker is back once it is ready for tasks: a Python process importing torch takes a while (tens of
        # seconds on a busy 2-core machine), which is no property of the pipeline's recovery.
        log = self.procs.log("worker-train")

        def ready() -> bool:
            with log.open("rb") as fh:
                fh.seek(offset)
                return b" ready." in fh.read()

        booted = wait_until(ready, self.opts.recovery_timeout_s, 0.1)
        back = now()
        took = wait_until(lambda: planned in self._revisions(user), self.opts.recovery_timeout_s, 0.2)
        p.recovery_s = None if took is None or booted is None else now() - back
        p.recovery_what = "the interrupted training completed (its planned revision written), from the worker ready"
        p.notes.append(f"worker ready {booted:.0f} s after its restart" if booted is not None else "worker not ready")
        at = self.procs.first_line_time("worker-train", offset, "] received")
        p.notes.append(
            f"task redelivered {(at - wall).total_seconds():.0f} s after the kill" if at else "no redelivery"
        )
        if took is not None:
            secs = self.sql(
                "SELECT manifest->'metrics'->>'train_seconds' FROM revisions WHERE revision_id = %s", (planned,)
            )
            p.notes.append(f"trained again from the start ({float(secs[0][0]):.0f} s of training)")
            p.notes.append(f"{now() - killed:.0f} s from the kill")
        gated = wait_until(
            lambda: bool(self.sql("SELECT 1 FROM decisions WHERE revision_id = %s", (planned,))), 30, 0.2
        )
        p.notes.append("gate decided" if gated is not None else "no gate decision 30 s after")
        self.say(f"   recovery: {fmt_recovery(p.recovery_s, self.opts.recovery_timeout_s)}; {'; '.join(p.notes)}")
        self.check_processes(p)
        self.settle()

    # -- the whole run --
    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            assert self.procs is not None
            self.begin("calm", "no fault (before)")
            self.load = Load(self.url, self.key, self.opts, self.phase, self.tag)
            self.load.start()
            time.sleep(5.0)
            for f in self.opts.faults:
                getattr(self, f"fault_{f}")()
            self.begin("after", "no fault (after)")
            sending = max(60.0, 3 * self.opts.events / self.opts.rate)
            self.say(f"faults done; clients finish (>= {self.opts.events} events acknowledged)")
            self.load.finish(sending)
            self.phase().ended = now()
            return self.account()
        finally:
            self.teardown()

    def account(self) -> dict[str, Any]:
        assert self.load is not None and self.procs is not None
        acked = dict(self.load.acked)
        want = list(acked)

        def buffered_ids() -> set[str]:
            rows = self.sql("SELECT event_id FROM events WHERE event_id = ANY(%s)", (want,))
            return {r[0] for r in rows}

        self.say(f"waiting for the buffers: {len(acked)} events acknowledged")
        t0, last, seen = now(), now(), 0
        while now() - last < 60 and now() - t0 < 300:
            n = len(buffered_ids())
            if n >= len(want):
                break
            if n > seen:
                seen, last = n, now()
            time.sleep(1.0)
        have = buffered_ids()
        dup_rows = self.sql("SELECT event_id, count(*) FROM events GROUP BY 1 HAVING count(*) > 1")
        dups = {r[0]: r[1] - 1 for r in dup_rows}
        for p in self.phases:
            ids = [e for e, k in acked.items() if k == p.key]
            p.acked = len(ids)
            p.buffered = sum(1 for e in ids if e in have)
            p.lost = p.acked - p.buffered
            p.duplicated = sum(dups.get(e, 0) for e in ids)
        counters = self.sql(
            "SELECT count(*) FILTER (WHERE s.total_events IS DISTINCT FROM e.n),"
            " coalesce(sum(s.total_events), 0) - coalesce(sum(e.n), 0),"
            " count(*) FILTER (WHERE s.pending_count IS DISTINCT FROM e.p),"
            " coalesce(sum(s.pending_count), 0) - coalesce(sum(e.p), 0)"
            " FROM (SELECT user_id, count(*) AS n, count(*) FILTER (WHERE consumed_by IS NULL) AS p"
            "       FROM events GROUP BY 1) e FULL JOIN user_state s USING (user_id)"
        )[0]
        dlq = self.read_dlq()
        self.say(f"buffered {len(have & set(want))}/{len(want)}; dead-lettered {sum(dlq.values())}")
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "kafka_storage": self.settings.stack.kafka_storage,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.opts).items()},
            "seconds": round(now() - self.t_start, 1),
            "code": code_state(),
            "phases": [phase_dict(p) for p in self.phases],
            "acked": len(acked),
            "buffered": len(have & set(want)),
            "lost": len(set(want) - have),
            "duplicated_rows": sum(dups.values()),
            "unacknowledged": self.load.unacked,
            "counter_drift": {
                "users_total_events_off": int(counters[0]),
                "total_events_minus_rows": int(counters[1]),
                "users_pending_off": int(counters[2]),
                "pending_minus_unconsumed_rows": int(counters[3]),
            },
            "dlq": dict(dlq),
            "logs": str(self.data_dir / "logs"),
        }

    def read_dlq(self) -> Counter:
        codes: Counter = Counter()
        try:
            consumer = KafkaConsumer(
                self.settings.kafka.topic_dlq,
                bootstrap_servers=self.settings.kafka.servers,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                group_id=f"faults-dlq-{uuid.uuid4().hex[:8]}",
                session_timeout_ms=6000,
                heartbeat_interval_ms=2000,
            )
        except Exception as e:
            codes[f"unreadable: {type(e).__name__}"] += 1
            return codes
        try:
            empty, deadline = 0, now() + 30
            while empty < 4 and now() < deadline:
                got = consumer.poll(timeout_ms=1000)
                empty = 0 if got else empty + 1
                for recs in got.values():
                    for rec in recs:
                        headers = dict(rec.headers or [])
                        codes[headers.get("persona.dlq.code", b"?").decode()] += 1
        finally:
            consumer.close()
        return codes

    def teardown(self) -> None:
        if self.load is not None:
            self.load.abort.set()
        if self.procs is not None:
            self.procs.stop_all()
        with contextlib.suppress(Exception):
            stack.down(self.settings)
        if not self.opts.keep:
            for sub in ("postgres", "s3", "kafka", "redis"):
                shutil.rmtree(self.data_dir / sub, ignore_errors=True)


def code_state() -> str:
    """The commit the run ran on, and the files changed since (read-only git commands)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        st = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    changed = sorted(line[3:] for line in st.stdout.splitlines() if line.strip())
    return f"commit {head.stdout.strip()}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def phase_dict(p: Phase) -> dict[str, Any]:
    d = asdict(p)
    d["client_retries"] = dict(p.client_retries)
    d["seconds"] = round((p.ended or now()) - p.started, 1)
    d.pop("started")
    d.pop("ended")
    return d


def fmt_recovery(s: float | None, timeout_s: float) -> str:
    return f"never (> {timeout_s:.0f} s)" if s is None else f"{s:.1f} s"


def table(result: dict[str, Any]) -> str:
    timeout = float(result["options"]["recovery_timeout_s"])
    rows = [
        "| fault | acknowledged | buffered | lost | duplicated | recovery | goal met | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for p in result["phases"]:
        fault = p["key"] not in ("calm", "after")
        rec = fmt_recovery(p["recovery_s"], timeout) if fault else "-"
        met = "-"
        if fault:
            met = "yes" if p["lost"] == 0 and p["duplicated"] == 0 and (p["recovery_s"] or 1e9) <= GOAL_S else "no"
        retries = ", ".join(f"{k} x{v}" for k, v in sorted(p["client_retries"].items()))
        notes = "; ".join([*p["notes"], *([f"client retries: {retries}"] if retries else [])])
        rows.append(
            f"| {p['label']} | {p['acked']:,} | {p['buffered']:,} | {p['lost']:,} | {p['duplicated']:,} | {rec} | "
            f"{met} | {notes.replace('|', '/') or '-'} |"
        )
    rows.append(
        f"| **all** | {result['acked']:,} | {result['buffered']:,} | {result['lost']:,} | "
        f"{result['duplicated_rows']:,} | | | |"
    )
    c = result["counter_drift"]
    dlq = ", ".join(f"{k} x{v}" for k, v in result["dlq"].items()) or "none"
    return "\n".join(
        [
            f"fault benchmark: {result['acked']:,} events acknowledged in {result['seconds']:.0f} s "
            f"({result['machine']}; tansu storage `{result['kafka_storage']}`; {result['when']})",
            f"code: {result['code']}",
            "",
            *rows,
            "",
            "recovery = seconds from the dependency being back (the service started again, the killed consumer "
            "restarted, the killed worker's restart ready) until: a probe event posted then is buffered (consumer, "
            "broker, PostgreSQL), the candidate is promoted and its pointer published and a probe event buffered "
            "(S3; tansu keeps its log there), the interrupted training "
            f"completed (worker). Goal: 0 lost, 0 duplicated, recovery <= {GOAL_S:.0f} s.",
            f"user_state counters vs rows, every user: {c['users_total_events_off']} users' total_events off "
            f"(sum off by {c['total_events_minus_rows']}), {c['users_pending_off']} users' pending_count off "
            f"(sum off by {c['pending_minus_unconsumed_rows']}); dead-lettered records: {dlq}; requests given up at "
            f"the end: {result['unacknowledged']} events.",
        ]
    )


def parse(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    d = Options()
    ap.add_argument("--quick", action="store_true", help="2,000+ events, one consumer kill (the CI test)")
    ap.add_argument("--events", type=int, default=None, help=f"events at least (default {d.events}; quick 2000)")
    ap.add_argument("--rate", type=float, default=None, help=f"events/s, all clients (default {d.rate:.0f}; quick 40)")
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--batch", type=int, default=d.batch, help="events per request")
    ap.add_argument("--faults", default=d.faults, help="which faults, in order (letters of abcde)")
    ap.add_argument("--consumer-kills", type=int, default=None, help="kills of fault a (default 3; quick 1)")
    ap.add_argument(
        "--down-s", type=float, default=None, help=f"seconds a stopped service stays down ({d.down_s:.0f}; quick 5)"
    )
    ap.add_argument("--recovery-timeout-s", type=float, default=d.recovery_timeout_s)
    ap.add_argument("--train-steps", type=int, default=None, help=f"steps of a training ({d.train_steps}; quick 100)")
    ap.add_argument("--kafka-storage", choices=["memory", "s3"], default=None, help="default: the stack's default")
    ap.add_argument("--data-dir", type=Path, default=None, help="default /tmp/persona-faults-HHMMSS")
    for name, port in (("kafka", d.kafka_port), ("s3", d.s3_port), ("pg", d.pg_port), ("redis", d.redis_port)):
        ap.add_argument(f"--{name}-port", type=int, default=port)
    ap.add_argument("--ingest-port", type=int, default=d.ingest_port)
    ap.add_argument(
        "--md", type=Path, default=None, help="the table's file (default bench/results/faults.md; quick: none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results (JSON) there")
    ap.add_argument("--keep", action="store_true", help="keep the stack's data (logs are always kept)")
    ap.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the processes")
    a = ap.parse_args(argv)
    if any(f not in FAULTS for f in a.faults):
        ap.error(f"--faults takes letters of {''.join(FAULTS)}")
    opts = Options(
        events=a.events or (2000 if a.quick else d.events),
        rate=a.rate or (40.0 if a.quick else d.rate),
        clients=a.clients,
        batch=a.batch,
        faults=a.faults,
        consumer_kills=a.consumer_kills if a.consumer_kills is not None else (1 if a.quick else 3),
        down_s=a.down_s if a.down_s is not None else (5.0 if a.quick else d.down_s),
        recovery_timeout_s=a.recovery_timeout_s,
        train_steps=a.train_steps or (100 if a.quick else d.train_steps),
        data_dir=a.data_dir,
        kafka_storage=a.kafka_storage,
        kafka_port=a.kafka_port,
        s3_port=a.s3_port,
        pg_port=a.pg_port,
        redis_port=a.redis_port,
        ingest_port=a.ingest_port,
        keep=a.keep,
        env=dict(kv.split("=", 1) for kv in a.env),
    )
    return opts, a


def main(argv: list[str] | None = None) -> int:
    opts, args = parse(argv)
    result = Bench(opts).run()
    text = table(result)
    print()
    print(text)
    md = args.md or (None if args.quick else RESULTS / "faults.md")
    for path, content in ((md, text + "\n"), (args.json, json.dumps(result, indent=2) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"wrote {path}")
    ok = result["lost"] == 0 and result["duplicated_rows"] == 0
    ok = ok and all(
        p["recovery_s"] is not None and p["recovery_s"] <= GOAL_S
        for p in result["phases"]
        if p["key"] not in ("calm", "after")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
