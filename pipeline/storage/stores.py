"""The stores a use case reads and writes, opened once per process: the PostgreSQL pool and the object store."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import DatabaseSettings, S3Settings
from pipeline.storage.db import Database
from pipeline.storage.objects import ObjectStore
from pipeline.storage.registry import Registry


@dataclass(frozen=True)
class Stores:
    """The process's PostgreSQL pool (`Database`) and its object store (the adapters bucket)."""

    db: Database
    objects: ObjectStore

    @classmethod
    def open(cls, database: DatabaseSettings, s3: S3Settings, *, name: str = "persona", wait: bool = True) -> Stores:
        """Open the pool and the object store client; ``wait``: see `Database` (a server passes False)."""
        return cls(Database(database, name=name, wait=wait), ObjectStore(s3))

    @property
    def registry(self) -> Registry:
        """Revisions with their objects (written and read verified)."""
        return Registry(self.db, self.objects)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Stores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
