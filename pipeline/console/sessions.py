"""Operator sessions: a login with an admin key gives a random session token (the cookie) and a CSRF token (every
form carries it); the server keeps only the sha256 of the session token. Sessions live in the console process:
a restart logs everyone out. Each request re-checks that the key is still active (revocation applies at once)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from pipeline.domain.apikeys import Principal

COOKIE = "persona_console"
MAX_SESSIONS = 10_000


@dataclass
class Session:
    principal: Principal
    csrf: str
    expires: float  # time.monotonic()
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) shown once on the next page

    @property
    def actor(self) -> str:
        """The actor recorded in the alias history and the audit rows."""
        return f"console:{self.principal.name}"

    @property
    def app(self) -> str | None:
        """The application this session is restricted to (None: the operator, every application)."""
        return self.principal.app_id

    def may_see(self, app: str | None) -> bool:
        """Whether this session may see what belongs to ``app``."""
        return self.principal.operator or (app is not None and app == self.principal.app_id)

    def check_csrf(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """The live sessions, by the sha256 of their token."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._by_digest: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), time.monotonic() + self.ttl_s)
        with self._lock:
            self._expire()
            if len(self._by_digest) >= MAX_SESSIONS:  # the oldest go first
                for key in sorted(self._by_digest, key=lambda k: self._by_digest[k].expires)[: MAX_SESSIONS // 10]:
                    del self._by_digest[key]
            self._by_digest[_digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._by_digest.get(_digest(token))
            if session is None:
                return None
            if session.expires <= time.monotonic():
                del self._by_digest[_digest(token)]
                return None
            return session

    def drop(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._by_digest.pop(_digest(token), None)

    def drop_key(self, key_id: str) -> None:
        """End every session of a key (it was revoked or expired)."""
        with self._lock:
            for k in [k for k, s in self._by_digest.items() if s.principal.key_id == key_id]:
                del self._by_digest[k]

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, s in self._by_digest.items() if s.expires <= now]:
            del self._by_digest[k]
