"""`persona demo`: the whole loop on the embedded stack, from simulated users' events to their personal answers.

Stages (each prints what it does; long ones print progress):
  1. the embedded stack (Kafka protocol, S3, PostgreSQL, Redis), migrations, an application key, the base model;
  2. the processes of a deployment, each its own `persona` process with a log in ``<data_dir>/logs``: ingest API,
     buffer consumer, training worker (queues train + evaluate), serving worker;
  3. K simulated users (`pipeline.demo.sim`), each with its own way of writing, send their events through the
     ingest API (plus a few invalid ones, answered with reasons or dead-lettered); the consumer buffers them;
  4. the scheduler (`persona beat`) claims the due users, the worker retrains each user's adapter from its previous
     revision, the gate judges the candidate and promotions are published; the serving worker hears them. Each
     user's state (queued, training and its step, evaluating, decided, serving) is read from the database;
  5. a table per user (events, revision chain, gate decision and reason, holdout NLL base -> promoted, seconds from
     the user's first event to the serving worker answering with the new revision), then one prompt answered by the
     base and by two users' personal models side by side.

Users are named ``{prefix}-000`` ...; the prefix defaults to a new one per run, so running the demo again trains new
users. Passing an earlier run's ``--prefix`` (with another ``--seed``) sends those users new events instead: they are
retrained from their production revision and the gate compares the candidate with it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from kafka import KafkaConsumer, KafkaProducer
from rich.console import Console

from pipeline import stack
from pipeline.config import Settings, child_env
from pipeline.demo import sim
from pipeline.demo.processes import DemoError, Processes, free_port, wait_ready
from pipeline.demo.report import UserRun, answers_table, input_table, users_table
from pipeline.domain.tasks import QUEUES
from pipeline.ingest.codec import reasons_from_headers
from pipeline.storage import apps, buffers, db, decisions, registry, training
from pipeline.storage.db import Database

APP_ID = "demo-app"
DEFAULT_PROMPT = "Write a short note about your weekend."


@dataclass(frozen=True)
class DemoOptions:
    users: int = 4
    events: int = 80
    steps: int = 6
    seed: int | None = None
    prefix: str | None = None
    base: str | None = None  # PERSONA_MODEL_BASE of the processes; None: the configured one
    prompt: str = DEFAULT_PROMPT
    answer_tokens: int = 40
    timeout_s: float = 3600.0
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the processes (tests tune training)


@dataclass
class DemoResult:
    users: list[UserRun]
    answers: list[tuple[str, str, str]]  # (model, x-persona-revision, text)
    seconds: float
    logs_dir: Path


def run(options: DemoOptions, *, console: Console, settings: Settings | None = None) -> DemoResult:
    """Run the demo end to end, print what happened and return it (the CI test reads the result)."""
    started = time.monotonic()
    quiet = logging.getLogger("pipeline")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the demo prints its own progress
    try:
        return _run(options, console, settings, started)
    finally:
        quiet.setLevel(level)


def _run(options: DemoOptions, console: Console, settings: Settings | None, started: float) -> DemoResult:
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1_000_000)
    prefix = options.prefix or f"d{datetime.now(UTC):%m%d%H%M%S}"
    base = settings or Settings()
    console.rule(f"persona demo: {options.users} users x {options.events} events, {options.steps} steps (seed {seed})")

    console.print("[bold][1/7][/bold] embedded stack")
    stack.up(base, console_progress=lambda m: console.print(f"      {m}"))
    urls = stack.effective_urls(base)
    cfg = base.replace(
        base.db.model_copy(update={"url": urls["db_url"]}),
        base.kafka.model_copy(update={"bootstrap_servers": urls["kafka_bootstrap_servers"]}),
    )
    for m in db.migrate(cfg.db):
        console.print(f"      applied migration {m.path.name}")
    with Database(cfg.db, name="persona-demo") as database:
        with database.connection() as conn:
            key_id, key = apps.create_key(conn, APP_ID, "persona demo", scopes=("ingest", "serve"))
            op_id, op_key = apps.create_key(conn, None, "persona demo: the console login", scopes=("admin",))
        console.print(
            f"      application {APP_ID!r}: API key {key_id} with scopes ingest, serve (only its sha256 is stored)"
        )
        console.print(f"      operator key {op_id} for the console's login (shown once): {op_key}")
        return _run_processes(options, console, base, cfg, urls, database, key, seed, prefix, started)


def _run_processes(
    options: DemoOptions,
    console: Console,
    base: Settings,
    cfg: Settings,
    urls: dict[str, str],
    database: Database,
    key: str,
    seed: int,
    prefix: str,
    started: float,
) -> DemoResult:

    model = options.base or base.model.base
    console.print(f"[bold][2/7][/bold] base model {model!r}")
    from pipeline.models.prepare import needs_prepare, prepare

    if needs_prepare(model):
        prepared = prepare(base.model.model_copy(update={"base": model}))
        how = "converted now" if prepared.built else "already prepared"
        console.print(
            f"      {prepared.path}: {prepared.parameters:,} parameters, sha256 {prepared.sha256[:16]}… "
            f"({how}, {prepared.seconds:.1f}s)"
        )

    ingest_port, serve_port = free_port(cfg.ingest.port), free_port(cfg.serving.port)
    console_port = free_port(cfg.console.port)
    overrides = {
        "PERSONA_DB_URL": urls["db_url"],
        "PERSONA_REDIS_URL": urls["redis_url"],
        "PERSONA_KAFKA_BOOTSTRAP_SERVERS": urls["kafka_bootstrap_servers"],
        "PERSONA_KAFKA_TOPIC_EVENTS": base.kafka.topic_events,
        "PERSONA_KAFKA_TOPIC_DLQ": base.kafka.topic_dlq,
        "PERSONA_KAFKA_TOPIC_PROMOTIONS": base.kafka.topic_promotions,
        "PERSONA_S3_ENDPOINT": urls["s3_endpoint"],
        "PERSONA_S3_BUCKET": base.s3.bucket,
        "PERSONA_STACK_DATA_DIR": str(base.stack.data_dir),
        "PERSONA_MODEL_BASE": model,
        "PERSONA_MODEL_CACHE_DIR": str(base.model.cache_dir),
        "PERSONA_INGEST_PORT": str(ingest_port),
        "PERSONA_SERVE_PORT": str(serve_port),
        # The operator console: its try-it box asks this run's serving worker with the demo application's key.
        "PERSONA_CONSOLE_PORT": str(console_port),
        "PERSONA_CONSOLE_SERVING_URL": f"http://127.0.0.1:{serve_port}",
        "PERSONA_CONSOLE_SERVE_KEY": key,
        "PERSONA_CONSUMER_METRICS_PORT": str(free_port(9101)),
        "PERSONA_WORKER_METRICS_PORT": str(free_port(9102)),
        "PERSONA_TRAIN_MAX_STEPS": str(options.steps),
        # Every user is due once its events are buffered; the beat starts only then (stage 5).
        "PERSONA_POLICY_MIN_NEW_EVENTS": "1",
        "PERSONA_POLICY_COOLDOWN_S": "0",
        "PERSONA_POLICY_TICK_S": "2",
        # Tasks an interrupted earlier run left queued must not hold this run's users back.
        "PERSONA_POLICY_MAX_IN_FLIGHT": "1000",
    }
    overrides.update(options.env)
    env = child_env(**overrides)
    logs_dir = base.stack.data_dir / "logs"
    procs = Processes(env, logs_dir)
    ingest_url, serve_url = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{serve_port}"
    console.print(f"[bold][3/7][/bold] processes (logs in {logs_dir})")
    try:
        procs.start("ingest", ["ingest", "serve"])
        procs.start("consumer", ["consume"])
        procs.start("worker", ["worker", "--queues", "train,evaluate", "--name", f"demo-{prefix}@%h"])
        procs.start("serving", ["serve"])
        procs.start("console", ["console"])
        wait_ready(
            "the ingest API",
            lambda: httpx.get(f"{ingest_url}/healthz", timeout=2).is_success,
            procs,
            procs.log("ingest"),
            60,
        )
        console_url = f"http://127.0.0.1:{console_port}"
        wait_ready(
            "the operator console",
            lambda: httpx.get(f"{console_url}/healthz", timeout=2).is_success,
            procs,
            procs.log("console"),
            60,
        )
        console.print(f"      ingest API   {ingest_url}")
        console.print(
            f"      operator console {console_url}/users (log in with the operator key above; it runs until the "
            "demo ends, `persona console` runs one on its own)"
        )
        console.print(f"      consumer, training worker (train + evaluate queues), serving worker {serve_url}")

        people = [UserRun(u.user_id, u.style["register"]) for u in sim.users(options.users, prefix=prefix)]
        with database.connection() as conn:
            for p in people:
                p.known_revisions = frozenset(r.revision_id for r in registry.list_revisions(conn, p.user_id))
        waiting = _queued_tasks(urls["redis_url"])
        if waiting:
            console.print(
                f"      [yellow]note:[/yellow] {waiting} task(s) of an earlier run wait in the queues; the worker "
                "runs them first"
            )
        dead = _send(cfg, ingest_url, key, people, options, seed, prefix, console)
        _wait_buffered(database, people, procs, console)

        console.print("[bold][5/7][/bold] scheduler -> training -> gate -> promotion -> serving")
        wait_ready(
            "the serving worker",
            lambda: httpx.get(f"{serve_url}/healthz", timeout=2).is_success,
            procs,
            procs.log("serving"),
            300,
        )
        procs.start("beat", ["beat", "--metrics-port", str(free_port(9103))])
        _follow(database, serve_url, key, people, procs, console, started, options.timeout_s)

        console.print("[bold][6/7][/bold] per-user results")
        console.print(input_table(dead))
        console.print(users_table(people))
        console.print(f"[bold][7/7][/bold] one prompt, three models: {options.prompt!r}")
        answers = _side_by_side(serve_url, key, people, options)
        console.print(answers_table(answers))
    finally:
        procs.stop()
    took = time.monotonic() - started
    console.print(
        f"done in {took:.0f}s. The stack keeps running: `persona users list --prefix {prefix}`, "
        f"`persona revisions list USER`, `persona stack status`; stop it with `persona stack down`."
    )
    return DemoResult(people, answers, took, logs_dir)


def _queued_tasks(redis_url: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return sum(int(client.llen(q)) for q in QUEUES)
    finally:
        client.close()


def _send(
    cfg: Settings,
    url: str,
    key: str,
    people: list[UserRun],
    options: DemoOptions,
    seed: int,
    prefix: str,
    console: Console,
) -> list[list[str]]:
    """Post every user's events (interleaved, in chunks) plus a few invalid ones; returns the DLQ reasons."""
    by_id = {p.user_id: p for p in people}
    events = [
        e
        for u in sim.users(options.users, prefix=prefix)
        for e in sim.events_for(u, options.events, app=APP_ID, seed=seed)
    ]
    random.Random(seed).shuffle(events)  # applications interleave their users
    invalid = sim.invalid_events(APP_ID, seed)
    console.print(
        f"[bold][4/7][/bold] {len(people)} users ({', '.join(sorted({p.register for p in people}))}) send "
        f"{len(events)} events (+{len(invalid)} invalid) to POST /v1/events"
    )
    rejected: list[dict] = []
    chunks = [events[i : i + 100] for i in range(0, len(events), 100)] or [[]]
    chunks[0] = chunks[0] + invalid
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for i, chunk in enumerate(chunks):
            r = client.post(f"{url}/v1/events", json=chunk)
            if r.status_code != 202:
                raise DemoError(f"POST /v1/events answered {r.status_code}: {r.text[:300]}")
            now = time.monotonic()
            for ev, res in zip(chunk, r.json()["results"], strict=True):
                if res["status"] == "rejected":
                    rejected.append(res)
                elif (p := by_id.get(str(ev.get("user_id")))) is not None:
                    p.sent += 1
                    p.first_event_at = p.first_event_at or now
            if i % 10 == 9 or i == len(chunks) - 1:
                console.print(f"      posted {min((i + 1) * 100, len(events))}/{len(events)}")
    console.print(f"      accepted {sum(p.sent for p in people)}, rejected {len(rejected)} with reasons:")
    for res in rejected:
        console.print("        " + "; ".join(f"{r['field']}: {r['code']}" for r in res["reasons"]))

    # Written straight to Kafka, past the API: bad JSON and a bad event id; the consumer dead-letters them.
    dlq_key = f"demo-dlq-{prefix}-{seed}".encode()
    straight = [b"{this is not json", orjson.dumps({**events[0], "event_id": "nope"})]
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.servers, acks="all")
    for value in straight:
        producer.send(cfg.kafka.topic_events, key=dlq_key, value=value)
    producer.flush()
    producer.close()
    return _read_dlq(cfg, dlq_key, len(straight))


def _wait_buffered(database: Database, people: list[UserRun], procs: Processes, console: Console) -> None:
    ids = [p.user_id for p in people]
    want = sum(p.sent for p in people)
    deadline, last = time.monotonic() + 300, time.monotonic()
    while True:
        with database.connection() as conn:
            n = buffers.unconsumed_count(conn, ids)
        if n >= want:
            break
        procs.check()
        if time.monotonic() - last > 5:
            console.print(f"      buffered {n}/{want}")
            last = time.monotonic()
        if time.monotonic() > deadline:
            raise DemoError(f"only {n} of {want} events reached the buffers in 300s; see {procs.log('consumer')}")
        time.sleep(0.5)
    with database.connection() as conn:
        kinds = buffers.kind_counts(conn, ids)
    for p in people:
        p.train_events = sum(n for (u, _, split), n in kinds.items() if u == p.user_id and split == "train")
        p.holdout_events = sum(n for (u, _, split), n in kinds.items() if u == p.user_id and split == "holdout")
        p.state = "buffered"
    console.print(f"      buffered {want}/{want} events in PostgreSQL (train / holdout split per user)")


def _short(revision_id: str | None) -> str:
    return "none" if revision_id is None else revision_id[-8:]


Say = Callable[[UserRun, str], None]


def _follow(
    database: Database,
    serve_url: str,
    key: str,
    people: list[UserRun],
    procs: Processes,
    console: Console,
    started: float,
    timeout_s: float,
) -> None:
    """Watch every user through queued -> training -> candidate -> decided -> serving, printing each change; every
    30 s without a change, a line with the users' states and the training steps their workers recorded."""
    deadline = time.monotonic() + timeout_s
    last_print = time.monotonic()

    def say(p: UserRun, state: str) -> None:
        nonlocal last_print
        if state != p.state:
            p.state = state
            last_print = time.monotonic()
            console.print(f"      {time.monotonic() - started:6.0f}s  {p.user_id}  {state}")

    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
        while not all(p.done for p in people):
            procs.check()
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{p.user_id} ({p.state})" for p in people if not p.done)
                raise DemoError(f"not done within {timeout_s:.0f}s: {waiting}; logs in {procs.logs_dir}")
            open_users = [p for p in people if not p.done]
            with database.connection() as conn:
                states = training.states_of(conn, [p.user_id for p in open_users])
                for p in open_users:
                    _observe(conn, http, serve_url, p, states.get(p.user_id), say)
            if time.monotonic() - last_print > 30:
                counts: dict[str, int] = {}
                for p in people:
                    state = p.outcome or p.state.split(" ")[0]
                    counts[state] = counts.get(state, 0) + 1
                steps = {
                    p.user_id: st.progress
                    for p in people
                    if p.state == "training" and (st := states.get(p.user_id)) is not None and st.progress is not None
                }
                console.print(
                    f"      {time.monotonic() - started:6.0f}s  waiting: "
                    + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                    + (
                        f" (steps: {', '.join(f'{u[-3:]} {g.step}/{g.max_steps}' for u, g in sorted(steps.items()))})"
                        if steps
                        else ""
                    )
                )
                last_print = time.monotonic()
            time.sleep(1.0)


def _observe(
    conn: Any, http: httpx.Client, serve_url: str, p: UserRun, state: training.TrainingState | None, say: Say
) -> None:
    revs = registry.list_revisions(conn, p.user_id)
    new = [r for r in revs if r.revision_id not in p.known_revisions]
    if not new:
        if state is not None and state.training:
            say(p, "training")
        elif state is not None and state.queued:
            say(p, "queued for training")
        return
    rev = new[-1]
    p.revision_id = rev.revision_id
    p.chain = [r.revision_id for r in revs]
    d = decisions.get(conn, rev.revision_id)
    if d is None:
        say(p, f"evaluating candidate {_short(rev.revision_id)} (parent {_short(rev.parent_id)})")
        return
    if p.outcome is None:
        p.outcome, p.reason = d.outcome, d.reason
        m = d.metrics or {}
        p.nll_base = (m.get("base") or {}).get("holdout_nll")
        p.nll_candidate = (m.get("candidate") or {}).get("holdout_nll")
        p.nll_current = (m.get("current") or {}).get("holdout_nll")
        say(p, d.reason if d.reason.startswith(d.outcome) else f"{d.outcome}: {d.reason}")
    if d.outcome != "promoted":
        return
    r = http.post(f"{serve_url}/v1/completions", json={"model": f"user:{p.user_id}", "prompt": "Hi", "max_tokens": 1})
    if r.is_success and r.headers.get("x-persona-revision") == p.revision_id:
        p.served_revision = p.revision_id
        if p.first_event_at is not None:
            p.seconds_to_serving = time.monotonic() - p.first_event_at
        say(p, f"serving {_short(p.revision_id)} ({p.seconds_to_serving or 0:.0f}s after its first event)")


def _side_by_side(serve_url: str, key: str, people: list[UserRun], options: DemoOptions) -> list[tuple[str, str, str]]:
    """The prompt answered by the base and by two promoted users of different styles (greedy, same tokens), asked
    with the demo application's key (the serving API serves a key its own application's users only)."""
    with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}) as http:
        base_id = http.get(f"{serve_url}/healthz").json()["base"]
        chosen: list[UserRun] = []  # users with a revision serving (this run's or an earlier one), styles apart
        for p in sorted(people, key=lambda p: p.served_revision is None):
            serving = p.served_revision or (
                p.chain
                and http.post(
                    f"{serve_url}/v1/completions", json={"model": f"user:{p.user_id}", "prompt": "Hi", "max_tokens": 1}
                ).is_success
            )
            if serving and all(c.register != p.register for c in chosen):
                chosen.append(p)
        models = [base_id] + [f"user:{p.user_id}" for p in chosen[:2]]
        out = []
        for model in models:
            r = http.post(
                f"{serve_url}/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": options.prompt}],
                    "max_tokens": options.answer_tokens,
                    "temperature": 0,
                },
            )
            if not r.is_success:
                raise DemoError(f"the serving worker answered {r.status_code} for {model}: {r.text[:300]}")
            text = r.json()["choices"][0]["message"]["content"]
            out.append((model, r.headers.get("x-persona-revision", "?"), text))
    return out


def _read_dlq(cfg: Settings, key: bytes, expect: int, timeout_s: float = 30.0) -> list[list[str]]:
    """Reason codes of the dead-letter records written under ``key``."""
    consumer = KafkaConsumer(
        cfg.kafka.topic_dlq,
        bootstrap_servers=cfg.kafka.servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=f"demo-reader-{key.decode()}-{time.time_ns()}",
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    found: list[list[str]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(found) < expect:
            for recs in consumer.poll(timeout_ms=500).values():
                found += [
                    [f"{r['field'] or 'record'}: {r['code']}" for r in reasons_from_headers(rec.headers)]
                    for rec in recs
                    if rec.key == key
                ]
    finally:
        consumer.close()
    return found
