"""Adapter revisions: identity (ULID), lifecycle, the manifest (provenance) and lineage. Pure logic, no I/O."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from ulid import ULID

from pipeline.domain.errors import InvalidInput
from pipeline.domain.events import valid_user_id

MANIFEST_SCHEMA: Final = "persona/registry/manifest.v1"
Status = Literal["candidate", "promoted", "rejected", "retired"]
STATUSES: Final = ("candidate", "promoted", "rejected", "retired")
PRODUCTION: Final = "production"
ADAPTER_FILES: Final = ("adapter_config.json", "adapter_model.safetensors")
_REVISION_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


def new_revision_id(at: datetime | None = None) -> str:
    """A new ULID: sortable by creation time, never reused."""
    return str(ULID.from_datetime(at) if at is not None else ULID())


def check_revision_id(value: str) -> str:
    """``value`` as a canonical (upper-case) revision id, or InvalidInput naming it."""
    canonical = value.strip().upper()
    if not _REVISION_ID.fullmatch(canonical):
        raise InvalidInput(f"revision id must be a ULID (26 Crockford base32 characters), got {value!r}")
    return canonical


#: The prefix of a ``model`` that names a user's adapter (the serving API's ``model`` field).
USER_MODEL_PREFIX: Final = "user:"
#: The longest user ``model`` accepted: ``user:`` + a 128-character user id + ``@`` + a 26-character revision id.
MAX_MODEL_NAME: Final = len(USER_MODEL_PREFIX) + 128 + 1 + 26


class InvalidModelName(InvalidInput):
    """``model`` is none of the accepted forms (the serving API answers 400 ``invalid_model``)."""

    code = "invalid_model"


@dataclass(frozen=True)
class ModelName:
    """What a ``model`` names: the base (``user_id`` None), a user's production alias (``revision_id`` None) or one
    revision of a user."""

    user_id: str | None
    revision_id: str | None = None

    @property
    def base(self) -> bool:
        return self.user_id is None


def _shown(value: str, limit: int = 48) -> str:
    # An error message names the bad value, but never echoes an unbounded one.
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def parse_model_name(model: str, base_id: str) -> ModelName:
    """Parse a serving ``model``: ``base_id``, ``user:{user_id}`` or ``user:{user_id}@{revision}``.

    User ids may contain ``@`` (``alice@example.com``), so the revision is the part after the LAST ``@``, and only
    when that part is a revision id (a ULID, any case); otherwise the whole remainder is the user id
    (``user:a@b`` is user ``a@b``, ``user:a@b@{ULID}`` is revision ULID of user ``a@b``). A user id that ends in
    ``@{ULID}`` is therefore reachable with an explicit revision only. InvalidModelName (400) for anything else: not
    one of the forms, an empty or malformed user id (1..128 characters of ``[A-Za-z0-9._:@-]``, not only dots; so
    no control character), or longer than MAX_MODEL_NAME."""
    if model == base_id:
        return ModelName(None)
    forms = f"'user:{{user_id}}', 'user:{{user_id}}@{{revision}}' or {base_id!r}"
    if len(model) > MAX_MODEL_NAME:
        raise InvalidModelName(
            f"model must be {forms}; got {_shown(model)}, longer than {MAX_MODEL_NAME} characters", param="model"
        )
    if not model.startswith(USER_MODEL_PREFIX):
        raise InvalidModelName(f"model must be {forms}, got {_shown(model)}", param="model")
    rest = model[len(USER_MODEL_PREFIX) :]
    head, at, tail = rest.rpartition("@")
    user, revision = rest, None
    if at and _REVISION_ID.fullmatch(tail.upper()):
        user, revision = head, tail.upper()
    if not valid_user_id(user):
        raise InvalidModelName(
            f"the user id of model must be 1..128 characters of [A-Za-z0-9._:@-] (not only dots), got {_shown(user)}"
            f" in {_shown(model)}",
            param="model",
        )
    return ModelName(user, revision)


@dataclass(frozen=True)
class BaseModelRef:
    """The frozen base an adapter was trained on."""

    model_id: str
    sha256: str


@dataclass(frozen=True)
class EventsUsed:
    """Which events a revision was trained on: count, ingestion positions and a digest of their ids."""

    count: int
    first_seq: int | None
    last_seq: int | None
    ids_sha256: str

    @classmethod
    def of(cls, rows: Iterable[tuple[str, int]]) -> EventsUsed:
        """From (event_id, seq) pairs. The digest is over the sorted ids, one per line."""
        pairs = list(rows)
        seqs = [s for _, s in pairs]
        digest = hashlib.sha256("\n".join(sorted(e for e, _ in pairs)).encode()).hexdigest()
        return cls(len(pairs), min(seqs) if seqs else None, max(seqs) if seqs else None, digest)


@dataclass(frozen=True)
class Revision:
    """One immutable revision of a user's adapter (its status is the only thing that changes)."""

    revision_id: str
    user_id: str
    parent_id: str | None
    status: Status
    artifact_uri: str
    sha256: str
    size_bytes: int
    manifest: dict[str, Any]
    created_at: datetime
    status_at: datetime


@dataclass(frozen=True)
class AliasMove:
    """One row of the alias history."""

    user_id: str
    alias: str
    from_revision: str | None
    to_revision: str
    reason: str
    actor: str
    at: datetime


@dataclass(frozen=True)
class User:
    """A user's identity and a summary of their adapter and buffer."""

    user_id: str
    app: str
    labels: dict[str, Any]
    created_at: datetime
    production: str | None = None
    revisions: int = 0
    pending_events: int = 0
    total_events: int = 0


def build_manifest(
    *,
    user_id: str,
    revision_id: str,
    parent_id: str | None,
    base: BaseModelRef,
    adapter_config: dict[str, Any],
    training: dict[str, Any],
    events: EventsUsed,
    metrics: dict[str, Any],
    artifact_sha256: str,
    artifact_size: int,
    code_version: str,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """The manifest of a revision (schemas/registry/manifest.v1.json). Only the registry's writer calls this."""
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return {
        "schema": MANIFEST_SCHEMA,
        "user_id": user_id,
        "revision_id": revision_id,
        "parent_revision_id": parent_id,
        "base_model": {"id": base.model_id, "sha256": base.sha256},
        "adapter": {
            "peft_type": adapter_config.get("peft_type", "LORA"),
            "rank": int(adapter_config["r"]),
            "alpha": adapter_config.get("lora_alpha"),
            "target_modules": sorted(targets),
            "dtype": adapter_config.get("persona_dtype", training.get("dtype", "float32")),
        },
        "artifact": {"file": ADAPTER_FILES[1], "sha256": artifact_sha256, "size_bytes": artifact_size},
        "training": training,
        "events": {
            "count": events.count,
            "first_seq": events.first_seq,
            "last_seq": events.last_seq,
            "ids_sha256": events.ids_sha256,
        },
        "metrics": metrics,
        "code_version": code_version,
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
    }


@dataclass
class LineageNode:
    """A revision in its user's tree of revisions."""

    revision: Revision
    serving: bool
    children: list[LineageNode] = field(default_factory=list)


def lineage(revisions: Sequence[Revision], production: str | None) -> list[LineageNode]:
    """The forest of a user's revisions (roots first, children by creation time), marking the serving one."""
    nodes = {r.revision_id: LineageNode(r, r.revision_id == production) for r in revisions}
    roots: list[LineageNode] = []
    for r in sorted(revisions, key=lambda r: (r.created_at, r.revision_id)):
        node = nodes[r.revision_id]
        parent = nodes.get(r.parent_id) if r.parent_id else None
        (parent.children if parent is not None else roots).append(node)
    return roots


def rollback_target(history: Sequence[AliasMove], current: str | None) -> str | None:
    """The revision that served before ``current``: the ``from`` of the latest move onto ``current``."""
    for move in reversed(history):
        if move.to_revision == current and move.from_revision is not None:
            return move.from_revision
    return None
