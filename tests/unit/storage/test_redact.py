"""db.redact masks every form of a PostgreSQL password before a URL reaches a log or a message."""

from __future__ import annotations

import pytest

from pipeline.storage.db import redact


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:s3cret@127.0.0.1:5432/persona", "postgresql://postgres:***@127.0.0.1:5432/persona"),
        ("postgresql://u:p@ss@w0rd@h/db", "postgresql://u:***@h/db"),  # a password holding @
        ("postgres://u:pa:ss@h:5432/db?sslmode=require", "postgres://u:***@h:5432/db?sslmode=require"),
        (
            "postgresql://u@h/db?password=topsecret&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql://u@h/db?sslmode=require&PASSWORD=x", "postgresql://u@h/db?sslmode=require&PASSWORD=***"),
        ("host=h user=u password=topsecret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password = 'a b\\' c' dbname=d", "host=h password = *** dbname=d"),
        ("postgresql://postgres@127.0.0.1:5432/persona", "postgresql://postgres@127.0.0.1:5432/persona"),
        ("host=/var/run/postgresql dbname=persona", "host=/var/run/postgresql dbname=persona"),
    ],
)
def test_passwords_are_masked_and_the_rest_kept(url: str, expected: str) -> None:
    assert redact(url) == expected
    for secret in ("s3cret", "ss@w0rd", "topsecret", "a b"):
        assert secret not in redact(url)
