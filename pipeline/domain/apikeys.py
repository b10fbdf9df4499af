"""API keys and the principals they authenticate: format, parsing, hashing and scopes (pure; storage keeps only the
hash).

A key belongs either to one application (scopes ``ingest``, ``serve``, ``admin``: post events, use the models of
that application's users, act on those users) or to the operator (no application, scope ``admin`` only: operator
actions on every application's users). A key is shown once when it is created; revoked or expired keys
authenticate nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

from pipeline.domain.errors import Forbidden, InvalidInput

Scope = Literal["ingest", "serve", "admin"]
SCOPES: Final[tuple[str, ...]] = get_args(Scope)
#: What `persona apps keys create` gives an application key when no --scope is named.
DEFAULT_APP_SCOPES: Final[tuple[str, ...]] = ("ingest", "serve")

_KEY = re.compile(r"pk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_BEARER = re.compile(r"[Bb]earer +(\S+) *")


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key). The key is shown once; only its sha256 is stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"pk_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The key id embedded in a well-formed key, or None for anything else."""
    m = _KEY.fullmatch(key)
    return m.group(1) if m else None


def hash_key(key: str) -> bytes:
    # Keys are 256-bit random secrets, so a plain sha256 is a safe hash (no password stretching needed).
    return hashlib.sha256(key.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None when there is none."""
    if not authorization:
        return None
    m = _BEARER.fullmatch(authorization)
    return m.group(1) if m else None


def check_scopes(scopes: list[str] | tuple[str, ...], *, operator: bool) -> tuple[str, ...]:
    """Validated, de-duplicated scopes in canonical order. InvalidInput names what is allowed."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise InvalidInput(f"unknown scope(s) {', '.join(map(repr, bad))}; allowed: {', '.join(SCOPES)}")
    out = tuple(s for s in SCOPES if s in scopes)
    if not out:
        raise InvalidInput(f"a key needs at least one scope of {', '.join(SCOPES)}")
    if operator and out != ("admin",):
        raise InvalidInput("an operator key (no application) has the scope 'admin' only")
    return out


@dataclass(frozen=True)
class Principal:
    """Who is asking: the key that authenticated, its application (None: the operator) and its scopes."""

    key_id: str
    app_id: str | None
    scopes: frozenset[str]
    expires_at: datetime | None = None

    @property
    def operator(self) -> bool:
        return self.app_id is None

    @property
    def name(self) -> str:
        """How logs, audit rows and alias history name this principal: ``app:ID/key:KID`` or ``operator/key:KID``."""
        return f"{'operator' if self.operator else 'app:' + str(self.app_id)}/key:{self.key_id}"

    def require(self, scope: Scope) -> None:
        """Forbidden unless this key carries ``scope``."""
        if scope not in self.scopes:
            raise Forbidden(
                f"key {self.key_id} has scope(s) {', '.join(sorted(self.scopes))}; this needs {scope!r}"
                " (`persona apps keys create --scope` issues keys with other scopes)"
            )

    def may_act_for(self, app_id: str | None) -> bool:
        """Whether this principal may reach users owned by ``app_id`` (None: an unknown user, which nobody may)."""
        return app_id is not None and (self.operator or self.app_id == app_id)
