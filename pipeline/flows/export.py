"""Exporting a user's adapter: a directory that stock ``peft.PeftModel.from_pretrained`` loads, plus its manifest."""

from __future__ import annotations

from pathlib import Path

import orjson

from pipeline.domain.errors import InvalidInput, NotFound
from pipeline.domain.revisions import Revision
from pipeline.storage import registry
from pipeline.storage.stores import Stores


def export(stores: Stores, user_id: str, target: Path, revision_id: str | None = None) -> Revision:
    """Write the production revision of ``user_id`` (or the named one, which must be theirs) to ``target``: its PEFT
    files, each verified against the sha256 the registry recorded before anything is written, and manifest.json."""
    with stores.db.connection() as conn:
        if revision_id is None:
            rev = registry.production(conn, user_id)
            if rev is None:
                raise NotFound(f"{user_id!r} has no production revision; name one with --revision")
        else:
            rev = registry.get_revision(conn, revision_id)
            if rev.user_id != user_id:
                raise InvalidInput(f"revision {rev.revision_id} belongs to {rev.user_id!r}, not {user_id!r}")
    stores.registry.download(rev, target)
    (target / "manifest.json").write_bytes(orjson.dumps(rev.manifest, option=orjson.OPT_INDENT_2))
    return rev
