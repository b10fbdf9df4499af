"""Real services for the integration tests, started once per test session (and stopped if this session started
them): the embedded stack's Kafka-protocol broker and S3 server, PostgreSQL and Redis. Each session works in a
fresh database, dropped at the end."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from pipeline import stack
from pipeline.config import ROOT, DatabaseSettings, EventSettings, KafkaSettings, S3Settings, Settings, StackSettings
from pipeline.serving.promotions import Announcer
from pipeline.storage import db
from pipeline.storage.stores import Stores
from tests.integration.helpers import Services

# Ports of their own, so the tests run beside a developer's `persona stack up` on the default ports.
TEST_STACK = Settings(
    StackSettings(data_dir=ROOT / ".persona-test"),
    KafkaSettings(bootstrap_servers="127.0.0.1:19092"),
    S3Settings(endpoint="127.0.0.1:18333"),
)


def _with_database(url: str, name: str) -> str:
    base, _, rest = url.rpartition("/")
    query = ("?" + rest.split("?", 1)[1]) if "?" in rest else ""
    return f"{base}/{name}{query}"


@pytest.fixture(scope="session")
def test_stack():
    """The test stack, started once per session; stopped at the end only if this session started it."""
    was_up = all(s.healthy for s in stack.status(TEST_STACK))
    stack.up(TEST_STACK)
    try:
        yield TEST_STACK
    finally:
        if not was_up:
            stack.down(TEST_STACK)


#: The applications the integration tests send events as, registered in every test database: the buffer consumer
#: dead-letters a record whose app is not registered (unknown_app), as in a deployment.
TEST_APPS = (
    *("a", "b", "test", "notes", "gate", "bench", "mail"),
    *("serve", "sdk", "h", "gpu", "durable", "direct", "chat"),
)


@contextlib.contextmanager
def fresh_database(test_stack) -> Iterator[DatabaseSettings]:
    """A new, migrated database on the test server; dropped afterwards."""
    server_url = stack.effective_urls(test_stack)["db_url"]
    name = f"persona_test_{uuid.uuid4().hex[:8]}"
    admin_url = _with_database(server_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database = DatabaseSettings(url=_with_database(server_url, name))
    try:
        db.migrate(database)
        with psycopg.connect(database.url, autocommit=True) as conn:
            for app_id in TEST_APPS:
                conn.execute("INSERT INTO apps (app_id, description) VALUES (%s, 'tests')", (app_id,))
        yield database
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def services(test_stack):
    with fresh_database(test_stack) as database:
        yield Services(kafka=test_stack.kafka, db=database, events=EventSettings(), s3=test_stack.s3)


@pytest.fixture(scope="session")
def stores(services):
    """The session database's pool and the test object store (what a process opens once)."""
    with Stores.open(services.db, services.s3, name="persona-test") as opened:
        yield opened


@pytest.fixture(scope="session")
def announcer(services):
    """The announcer of the test broker's promotions topic."""
    made = Announcer(services.kafka)
    yield made
    made.close()


@pytest.fixture(scope="module")
def own_services(test_stack):
    """Services with a database of the test module's own: for tests that look at every user (the scheduler)."""
    with fresh_database(test_stack) as database:
        yield Services(kafka=test_stack.kafka, db=database, events=EventSettings(), s3=test_stack.s3)
