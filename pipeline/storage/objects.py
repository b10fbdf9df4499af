"""Object store (S3 API through the minio client): revision directories, production pointers, user prefixes.

Layout in the bucket (docs/architecture.md, "Contracts")::

    users/{user_id}/revisions/{revision_id}/adapter_config.json
    users/{user_id}/revisions/{revision_id}/adapter_model.safetensors     (sha256 recorded in the registry)
    users/{user_id}/revisions/{revision_id}/manifest.json
    users/{user_id}/production.json                                      (revision, sha256, uri, promoted_at)

Every write is read back and its sha256 checked before the caller may point a row at it; every read checks the
sha256 it was given before returning bytes. Transient errors (connection failures, 5xx, throttling) are retried
with exponential backoff; anything else fails at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from pipeline.config import S3Settings
from pipeline.domain.errors import NotFound, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}


class ObjectStoreError(Unavailable):
    """The object store failed (after retries, for transient errors)."""

    code = "object_store_unavailable"


class CorruptObject(Unavailable):
    """An object's bytes do not have the sha256 the registry recorded: nothing was loaded."""

    code = "adapter_corrupt"
    retry_after_s = None  # retrying reads the same bytes: an operator has to act (e.g. roll back)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def revision_prefix(user_id: str, revision_id: str) -> str:
    return f"users/{user_id}/revisions/{revision_id}/"


def pointer_key(user_id: str) -> str:
    return f"users/{user_id}/production.json"


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


class ObjectStore:
    """The adapters bucket. One instance per process is enough (the minio client is thread-safe)."""

    def __init__(self, settings: S3Settings | None = None, *, attempts: int = 5, backoff_s: float = 0.2) -> None:
        self.settings = settings or S3Settings()
        self.bucket = self.settings.bucket
        self.attempts = attempts
        self.backoff_s = backoff_s
        # minio's own urllib3 pool retries too; keep its retries short so ours (which know what is transient) rule.
        # maxsize: connections kept per host; serving workers fetch adapters from several threads at once (with the
        # default of 1, every other parallel fetch opened a connection and threw it away).
        http = urllib3.PoolManager(
            maxsize=32,
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(total=1, backoff_factor=0.1, status_forcelist=[]),
        )
        self.client = Minio(
            self.settings.endpoint,
            access_key=self.settings.access_key,
            secret_key=self.settings.secret_key.get_secret_value(),
            secure=self.settings.secure,
            region=self.settings.region,
            http_client=http,
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # --- retries ---
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except S3Error as e:
                if e.code not in _TRANSIENT_CODES or attempt == self.attempts:
                    raise
                log.warning("%s: transient S3 error %s (attempt %d/%d)", what, e.code, attempt, self.attempts)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if attempt == self.attempts:
                    raise ObjectStoreError(f"{what}: the object store at {self.settings.endpoint} failed: {e}") from e
                log.warning("%s: %s (attempt %d/%d)", what, e, attempt, self.attempts)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    # --- bytes ---
    def put_verified(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        """Write ``data`` at ``key``, read it back and check its sha256; raise CorruptObject if it differs."""
        digest = sha256_hex(data)
        self._call(
            f"put {key}",
            lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type),
        )
        stored = self.get(key)
        if sha256_hex(stored) != digest:
            raise CorruptObject(f"{self.uri(key)} reads back with another sha256 than was written ({digest[:12]})")
        return StoredObject(key, digest, len(data))

    def get(self, key: str) -> bytes:
        """The bytes at ``key``; NotFound if there is no such object."""

        def read() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        try:
            return self._call(f"get {key}", read)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"no object {self.uri(key)}") from e
            raise ObjectStoreError(f"get {self.uri(key)}: {e.code}: {e.message}") from e

    def get_verified(self, key: str, sha256: str) -> bytes:
        """The bytes at ``key`` if their sha256 is ``sha256``; CorruptObject otherwise (nothing is returned)."""
        data = self.get(key)
        actual = sha256_hex(data)
        if actual != sha256:
            raise CorruptObject(
                f"{self.uri(key)} is corrupt: sha256 {actual[:16]}... but the registry recorded {sha256[:16]}...; "
                "refusing to load it"
            )
        return data

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", lambda: self.client.stat_object(self.bucket, key))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    # --- users ---
    def list_user(self, user_id: str) -> list[str]:
        """Every object key under the user's prefix."""
        prefix = f"users/{user_id}/"
        return self._call(
            f"list {prefix}",
            lambda: [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)],
        )

    def delete_user(self, user_id: str) -> list[str]:
        """Delete every object under the user's prefix; return the keys deleted."""
        keys = self.list_user(user_id)
        self.delete_keys(keys, what=f"users/{user_id}/")
        return keys

    def delete_keys(self, keys: list[str], *, what: str = "objects") -> None:
        """Delete ``keys`` (a missing key is not an error); ObjectStoreError when some could not be deleted."""
        if not keys:
            return
        errors = self._call(
            f"delete {what}",
            lambda: list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys])),
        )
        if errors:
            raise ObjectStoreError(f"could not delete {len(errors)} of {len(keys)} object(s) of {what}: {errors[0]}")

    def versioning(self) -> str | None:
        """The bucket's versioning status (``Enabled``, ``Suspended`` or ``Off``), None when it cannot be read: with
        versioning on, a deleted object leaves noncurrent versions behind."""
        try:
            status = self._call("get versioning", lambda: self.client.get_bucket_versioning(self.bucket).status)
        except Exception as e:  # a read-only question: a refusal must not fail the caller
            log.warning("could not read the versioning of bucket %s: %s", self.bucket, e)
            return None
        return str(status) if status else "Off"  # no status: versioning was never enabled

    def publish_pointer(self, user_id: str, revision_id: str, sha256: str, uri: str, promoted_at: str) -> None:
        """Write users/{user}/production.json: what serves the user now."""
        body = orjson.dumps(
            {"user_id": user_id, "revision": revision_id, "sha256": sha256, "uri": uri, "promoted_at": promoted_at},
            option=orjson.OPT_INDENT_2,
        )
        self.put_verified(pointer_key(user_id), body, "application/json")

    def delete_pointer(self, user_id: str) -> None:
        self._call("delete pointer", lambda: self.client.remove_object(self.bucket, pointer_key(user_id)))

    def read_pointer(self, user_id: str) -> dict | None:
        try:
            return orjson.loads(self.get(pointer_key(user_id)))
        except NotFound:
            return None
