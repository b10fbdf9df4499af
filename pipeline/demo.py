"""`persona demo`: the main job on the embedded stack, with progress, ending in the per-user buffer table.

Today it covers the first stage of the loop: simulated applications post events to the ingest API (a real HTTP
server in its own process), the buffer consumer (its own process) moves them from Kafka into PostgreSQL, and
invalid input is answered with reasons (API) or dead-lettered (records written straight to Kafka).
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import psycopg
from kafka import KafkaConsumer, KafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import sim, stack
from pipeline.config import ROOT, Settings, child_env
from pipeline.domain.errors import PersonaError
from pipeline.ingest.codec import reasons_from_headers
from pipeline.reports import buffer_table
from pipeline.storage import apps, buffers, db

APP_ID = "demo-app"


class DemoError(PersonaError):
    """The demo could not run; the message says which part failed and where its log is."""


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the ingest API exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError(f"the ingest API did not answer {url} within {timeout_s:.0f}s; see {log}")


def run(*, users: int, events: int, seed: int | None, console: Console) -> None:
    """Run the demo end to end and print what happened."""
    started = time.monotonic()
    logging.getLogger("pipeline").setLevel(logging.WARNING)  # the demo prints its own progress
    seed = seed if seed is not None else random.SystemRandom().randrange(1_000_000)
    base = Settings()
    console.rule(f"persona demo: {users} users x {events} events (seed {seed})")

    console.print("[bold][1/6][/bold] embedded stack")
    stack.up(base, console_progress=lambda m: console.print(f"      {m}"))
    urls = stack.effective_urls(base)
    settings = Settings(base.db.model_copy(update={"url": urls["db_url"]}), base.kafka, base.ingest, base.events)
    env = child_env(PERSONA_DB_URL=urls["db_url"], PERSONA_REDIS_URL=urls["redis_url"])
    logs_dir = base.stack.data_dir / "logs"

    console.print("[bold][2/6][/bold] database migrations")
    for m in db.migrate(settings.db):
        console.print(f"      applied {m.path.name}")

    console.print(f"[bold][3/6][/bold] application {APP_ID!r}: issuing an API key")
    with db.connect(settings.db) as conn:
        key_id, key = apps.create_key(conn, APP_ID, "persona demo")
    console.print(f"      key {key_id} (only its sha256 is stored)")

    console.print("[bold][4/6][/bold] starting the ingest API and the buffer consumer")
    api_log, consumer_log = logs_dir / "demo-ingest.log", logs_dir / "demo-consumer.log"
    api = _spawn(["ingest", "serve"], env, api_log)
    consumer = _spawn(["consume"], env, consumer_log)
    url = f"http://{settings.ingest.host}:{settings.ingest.port}"
    try:
        _wait_http(f"{url}/healthz", api, api_log)
        console.print(f"      ingest API {url} (pid {api.pid}), consumer pid {consumer.pid}; logs in {logs_dir}")
        _send_and_wait(settings, url, key, users, events, seed, consumer, consumer_log, console)
    finally:
        _stop(api)
        _stop(consumer)
    console.print(
        f"done in {time.monotonic() - started:.1f}s. The stack keeps running: `persona users list`, "
        "`persona stack status`; stop it with `persona stack down`."
    )


def _send_and_wait(
    settings: Settings,
    url: str,
    key: str,
    users: int,
    events: int,
    seed: int,
    consumer: subprocess.Popen,
    consumer_log: Path,
    console: Console,
) -> None:
    prefix = "user"
    people = sim.users(users, prefix=prefix)
    batch = [e for u in people for e in sim.events_for(u, events, app=APP_ID, seed=seed)]
    random.Random(seed).shuffle(batch)  # applications interleave their users
    invalid = sim.invalid_events(APP_ID, seed)

    console.print(f"[bold][5/6][/bold] sending {len(batch)} events (+{len(invalid)} invalid) to POST /v1/events")
    rejected: list[dict] = []
    accepted = 0
    chunks = [batch[i : i + 100] for i in range(0, len(batch), 100)]
    chunks[0] = chunks[0] + invalid
    with _progress(console) as progress, httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
        task = progress.add_task("      posting", total=len(batch) + len(invalid))
        for chunk in chunks:
            r = client.post(f"{url}/v1/events", json=chunk, timeout=30)
            if r.status_code != 202:
                raise DemoError(f"POST /v1/events answered {r.status_code}: {r.text[:300]}")
            body = r.json()
            accepted += body["accepted"]
            rejected += [x for x in body["results"] if x["status"] == "rejected"]
            progress.advance(task, len(chunk))

    dlq_key = f"demo-dlq-{seed}".encode()
    # Written straight to Kafka, past the API: bad JSON, a bad event id, and a key that is not the user id.
    straight = [b"{this is not json", orjson.dumps({**batch[0], "event_id": "nope"}), orjson.dumps(batch[0])]
    producer = KafkaProducer(bootstrap_servers=settings.kafka.servers, acks="all")
    for value in straight:
        producer.send(settings.kafka.topic_events, key=dlq_key, value=value)
    producer.flush()
    producer.close()

    ids = [e["event_id"] for e in batch]
    console.print("[bold][6/6][/bold] waiting for the buffer consumer")
    with _progress(console) as progress, psycopg.connect(settings.db.url) as conn:
        task = progress.add_task("      buffered", total=len(ids))
        deadline = time.monotonic() + 300
        while True:
            n = conn.execute("SELECT count(*) FROM events WHERE event_id = ANY(%s)", (ids,)).fetchone()[0]
            progress.update(task, completed=n)
            if n == len(ids):
                break
            if consumer.poll() is not None:
                raise DemoError(f"the buffer consumer exited with {consumer.returncode}; see {consumer_log}")
            if time.monotonic() > deadline:
                raise DemoError(f"only {n} of {len(ids)} events reached the buffers in 300s; see {consumer_log}")
            time.sleep(0.5)
            conn.commit()
        rows = buffers.list_buffers(conn, user_prefix=prefix + "-")
        kinds = buffers.kind_counts(conn, user_prefix=prefix + "-")

    dead = _read_dlq(settings, dlq_key, len(straight))
    console.print(buffer_table(rows, kinds))
    summary = Table(title="what happened to the input", show_header=True)
    summary.add_column("path")
    summary.add_column("count", justify="right")
    summary.add_column("reasons (field: code)")
    summary.add_row("accepted by the API", str(accepted), "")
    codes = Counter(f"{r['field']}: {r['code']}" for x in rejected for r in x["reasons"])
    summary.add_row("rejected by the API (202 body)", str(len(rejected)), ", ".join(sorted(codes)))
    dcodes = Counter(c for reasons in dead for c in reasons)
    summary.add_row(
        "written straight to Kafka, dead-lettered", f"{len(dead)} of {len(straight)}", ", ".join(sorted(dcodes))
    )
    console.print(summary)


def _read_dlq(settings: Settings, key: bytes, expect: int, timeout_s: float = 20.0) -> list[list[str]]:
    """Reason codes of the dead-letter records written under ``key``."""
    consumer = KafkaConsumer(
        settings.kafka.topic_dlq,
        bootstrap_servers=settings.kafka.servers,
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


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
