"""Migrations are idempotent and append-only; the producer SDK validates locally and lands events once."""

from __future__ import annotations

import shutil
import uuid

import psycopg
import pytest

from pipeline.demo import sim
from pipeline.domain.errors import InvalidInput
from pipeline.ingest.producer import EventProducer
from pipeline.storage import db
from pipeline.storage.db import MIGRATIONS_DIR, StorageError
from tests.integration.helpers import drain, fresh_topics, rows_and_pending

pytestmark = pytest.mark.integration


def test_migrate_is_idempotent(services):
    assert db.migrate(services.db) == []  # the session fixture already migrated
    assert [v for v, _, _ in db.applied(services.db)] == [m.version for m in db.migrations()]


def test_a_changed_migration_is_refused(services, tmp_path):
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    first = sorted(tmp_path.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    with pytest.raises(StorageError, match="changed after it was applied"):
        db.migrate(services.db, tmp_path)


def test_misnamed_migration_is_refused(tmp_path):
    (tmp_path / "1_x.sql").write_text("SELECT 1")
    with pytest.raises(StorageError, match=r"NNNN_lower_snake\.sql"):
        db.migrations(tmp_path)


def test_migrate_applies_new_files_in_order_once(services, tmp_path):
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    table = f"t_{uuid.uuid4().hex[:8]}"
    (tmp_path / "9998_extra_a.sql").write_text(f"CREATE TABLE {table} (x int);")
    (tmp_path / "9999_extra_b.sql").write_text(f"INSERT INTO {table} VALUES (1);")
    assert [m.version for m in db.migrate(services.db, tmp_path)] == [9998, 9999]
    assert db.migrate(services.db, tmp_path) == []
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1
        conn.execute(f"DROP TABLE {table}")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 9998")


def test_producer_sdk(services):
    kafka = fresh_topics(services.kafka)
    prefix = f"sdk-{uuid.uuid4().hex[:6]}"
    good = [e for u in sim.users(2, prefix=prefix) for e in sim.events_for(u, 15, app="sdk", seed=3)]
    bad = dict(good[0], kind="shout")
    with EventProducer(kafka, services.events) as producer:
        result = producer.send([*good, bad])
        assert [i for i, _ in result.accepted] == list(range(len(good)))
        assert [(i, r.codes) for i, r in result.rejected] == [(len(good), ["unknown_kind"])]
        with pytest.raises(InvalidInput, match="index 30"):
            result.raise_for_rejected()
        producer.send(good[:10])  # a retry of part of it: no new rows
    drain(services, kafka, expect=len(good) + 10)
    rows, pending = rows_and_pending(services.db, prefix)
    assert sum(rows.values()) == len(good) and pending == rows
