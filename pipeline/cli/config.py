"""`persona config table`: the configuration table, generated from the settings classes (docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Configuration.", no_args_is_help=True)


def config_markdown() -> str:
    """The configuration table (Markdown) from the settings classes: variable, default, description."""
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


@app.command("table")
def config_table() -> None:
    """Print the configuration table (Markdown) generated from the settings classes."""
    print(config_markdown())
