"""Real services for the integration tests, started once per test session (and stopped if this session started
them): the embedded stack's Kafka-protocol broker and S3 server, PostgreSQL and Redis. Each session works in a
fresh database, dropped at the end."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from pipeline.config import DatabaseSettings, EventSettings, KafkaSettings
from pipeline.storage import db
from tests.integration.helpers import Services


def _with_database(url: str, name: str) -> str:
    base, _, rest = url.rpartition("/")
    query = ("?" + rest.split("?", 1)[1]) if "?" in rest else ""
    return f"{base}/{name}{query}"


@pytest.fixture(scope="session")
def services():
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:29092")  # TEMP: dev broker until the stack lands
    server_url = DatabaseSettings().url
    name = f"persona_test_{uuid.uuid4().hex[:8]}"
    admin_url = _with_database(server_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database = DatabaseSettings(url=_with_database(server_url, name))
    db.migrate(database)
    try:
        yield Services(kafka=kafka, db=database, events=EventSettings())
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
