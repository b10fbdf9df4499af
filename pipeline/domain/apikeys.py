"""API keys of applications: format, parsing and hashing (pure; storage keeps only the hash)."""

from __future__ import annotations

import hashlib
import re
import secrets

_KEY = re.compile(r"pk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key). The key is shown once; only its sha256 is stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"pk_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The key id embedded in a well-formed key, or None for anything else."""
    m = _KEY.fullmatch(key)
    return m.group(1) if m else None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
