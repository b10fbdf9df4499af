"""API keys on the serving path: who is asking, without a database round trip per request.

`KeyCache` remembers what a key authenticated to (a `Principal`, or None for a key that authenticates nothing) for
``ttl_s`` seconds, keyed by the sha256 of the key (the raw key is never kept). So a key revoked in the registry
stops working on a worker within ``ttl_s``; an expiry (``expires_at``) is exact, checked on every hit. Refused keys
are remembered in a separate, smaller LRU, so a flood of made-up keys neither evicts the good ones nor reaches the
database more than once per key and TTL. Keys that are not even well-formed never reach the database.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from pipeline.domain import apikeys
from pipeline.domain.apikeys import Principal
from pipeline.domain.errors import Unauthorized
from pipeline.observability import metrics as obs

MISSING_KEY = (
    "no API key: send the header 'Authorization: Bearer <key>' with an application key that has the 'serve' scope"
)
INVALID_KEY = "the API key is not valid (unknown, revoked or expired); `persona apps keys create` issues keys"


class KeyCache:
    """Thread-safe TTL + LRU memo of ``lookup(key) -> Principal | None`` (see the module doc)."""

    def __init__(
        self,
        lookup: Callable[[str], Principal | None],
        *,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        counted: Callable[[str], None] | None = None,
    ) -> None:
        """``counted(source)`` counts each `principal` call by source ("cache" or "database"); default: the
        ``persona_serving_key_lookups_total`` counter of this process."""
        if ttl_s < 0 or max_entries < 1:
            raise ValueError(f"need ttl_s >= 0 and max_entries >= 1, got {ttl_s} and {max_entries}")
        self.lookup = lookup
        self.counted = counted or (lambda source: obs.SERVING_KEY_LOOKUPS.labels(source).inc())
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.now = now
        self._lock = threading.Lock()
        self._good: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._bad: OrderedDict[bytes, float] = OrderedDict()  # refused keys: at most a quarter of the room

    def cached(self, key: str) -> tuple[bool, Principal | None]:
        """(known, principal) from memory only: ``known`` False means `principal` must ask the database."""
        if apikeys.key_id_of(key) is None:
            return True, None
        digest = apikeys.hash_key(key)
        t = self.clock()
        with self._lock:
            good = self._good.get(digest)
            if good is not None:
                if t - good[0] < self.ttl_s:
                    self._good.move_to_end(digest)
                    expires = good[1].expires_at
                    return True, good[1] if expires is None or expires > self.now() else None
                del self._good[digest]
            bad = self._bad.get(digest)
            if bad is not None:
                if t - bad < self.ttl_s:
                    return True, None
                del self._bad[digest]
        return False, None

    def principal(self, key: str) -> Principal | None:
        """The principal of ``key`` (None: it authenticates nothing); asks ``lookup`` at most once per TTL.
        ``lookup``'s errors (the database is down) propagate: they are not a refusal."""
        known, found = self.cached(key)
        self.counted("cache" if known else "database")
        if known:
            return found
        found = self.lookup(key)
        if self.ttl_s > 0:
            digest = apikeys.hash_key(key)
            t = self.clock()
            with self._lock:
                if found is not None:
                    self._good[digest] = (t, found)
                    self._good.move_to_end(digest)
                    self._bad.pop(digest, None)
                    while len(self._good) > self.max_entries:
                        self._good.popitem(last=False)
                else:
                    self._bad[digest] = t
                    self._bad.move_to_end(digest)
                    while len(self._bad) > max(1, self.max_entries // 4):
                        self._bad.popitem(last=False)
        if found is not None and found.expires_at is not None and found.expires_at <= self.now():
            return None
        return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._good) + len(self._bad)


def bearer_key(authorization: str | None) -> str:
    """The key of an ``Authorization: Bearer`` header value; Unauthorized (401) when there is none."""
    key = apikeys.bearer_token(authorization)
    if key is None:
        raise Unauthorized(MISSING_KEY)
    return key
