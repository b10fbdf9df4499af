"""`python -m workers`: the scheduler waits for PostgreSQL instead of exiting, and the argument parser."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from pipeline.config import DatabaseSettings, Settings
from workers import __main__ as entry


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_scheduler_retries_an_unreachable_database_with_backoff_until_stopped(caplog):
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/persona"
    settings = Settings(DatabaseSettings(url=url, connect_timeout_s=1))
    stop = threading.Event()
    threading.Timer(2.5, stop.set).start()
    with caplog.at_level(logging.WARNING, logger="workers"):
        assert entry._open_database(settings, stop) is None  # gave up only because it was told to stop
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2 and "cannot connect to PostgreSQL" in retries[0].getMessage()


def test_the_command_line_names_what_is_allowed():
    with pytest.raises(SystemExit) as e:
        entry.main(["nonsense"])
    assert e.value.code == 2
