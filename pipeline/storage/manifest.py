"""Validation of revision manifests against schemas/registry/manifest.v1.json."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from pipeline.config import SCHEMAS_DIR
from pipeline.domain.errors import InvalidInput


@cache
def _validator() -> Draft202012Validator:
    schema = json.loads((SCHEMAS_DIR / "registry" / "manifest.v1.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise InvalidInput naming every path that breaks the manifest schema."""
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        detail = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)
        raise InvalidInput(f"manifest does not match manifest.v1: {detail}")
