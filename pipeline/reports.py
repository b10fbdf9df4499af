"""Tables that the CLI and the demo print (rich), and the README's configuration table (Markdown)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rich.table import Table

from pipeline.storage.buffers import UserBuffer


def _ts(t: datetime | None) -> str:
    return t.strftime("%H:%M:%S") if t else "-"


def buffer_table(rows: list[UserBuffer], kinds: dict[tuple[str, str, str], int]) -> Table:
    """One row per user: buffered events by kind, train/holdout split, pending count and times."""
    table = Table(title="per-user event buffers")
    for col in (
        "user",
        "message",
        "feedback",
        "preference",
        "edit",
        "train",
        "holdout",
        "pending",
        "total",
        "oldest pending",
        "last event",
    ):
        table.add_column(col, justify="left" if col == "user" else "right")
    for r in rows:
        by_kind = {
            k: sum(n for (u, kk, _), n in kinds.items() if u == r.user_id and kk == k)
            for k in ("message", "feedback", "preference", "edit")
        }
        by_split = {
            s: sum(n for (u, _, ss), n in kinds.items() if u == r.user_id and ss == s) for s in ("train", "holdout")
        }
        table.add_row(
            r.user_id,
            *(str(by_kind[k]) for k in by_kind),
            str(by_split["train"]),
            str(by_split["holdout"]),
            str(r.pending_count),
            str(r.total_events),
            _ts(r.oldest_pending_at),
            _ts(r.last_event_at),
        )
    return table


def config_markdown() -> str:
    """The configuration table of the README, from the settings classes (names, defaults, descriptions)."""
    from pipeline.config import ALL_SETTINGS, ROOT

    lines = ["| variable | default | description |", "| --- | --- | --- |"]
    for cls in ALL_SETTINGS:
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            default = field.default
            if hasattr(default, "get_secret_value"):
                default = "(secret)"
            if isinstance(default, Path) and default.is_relative_to(ROOT):
                default = default.relative_to(ROOT)  # the same table in every checkout
            shown = str(default).replace("|", "\\|")
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name.upper()}` | `{shown}` | {desc} |")
    return "\n".join(lines)
