"""What a worker process owns for its whole life, opened on first use: its settings (from the environment), one
PostgreSQL pool, the object store and the announcer of the promotions topic.

Opening is retried on the next call when it fails (PostgreSQL down at start): nothing broken is kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.serving.promotions import Announcer
from pipeline.storage.stores import Stores


@dataclass(frozen=True)
class Resources:
    """The process's settings, stores (pool + object store) and announcer."""

    settings: Settings
    stores: Stores
    announcer: Announcer


_settings: Settings | None = None
_resources: Resources | None = None
_lock = threading.Lock()


def settings() -> Settings:
    """The process's settings, read from the environment once."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings()
        return _settings


def resources() -> Resources:
    """The process's resources, opened on the first call (StorageError when PostgreSQL does not answer)."""
    global _resources
    s = settings()
    with _lock:
        if _resources is None:
            stores = Stores.open(s.db, s.s3, name="persona-worker")
            _resources = Resources(s, stores, Announcer(s.kafka))
        return _resources


def close() -> None:
    """Close what `resources` opened (the next call opens anew)."""
    global _resources
    with _lock:
        if _resources is not None:
            _resources.stores.close()
            _resources.announcer.close()
            _resources = None
