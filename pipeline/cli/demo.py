"""`persona demo`: the whole loop on the embedded stack (`pipeline.demo`)."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli.common import console


def demo(
    users: Annotated[int, typer.Option(min=1, max=100, help="Simulated users.")] = 4,
    events: Annotated[int, typer.Option(min=15, max=10000, help="Events per user.")] = 80,
    steps: Annotated[int, typer.Option(min=1, max=10000, help="Training steps per retrain, at most.")] = 6,
    seed: Annotated[int | None, typer.Option(help="Seed of the simulator (default: a new one each run).")] = None,
    prefix: Annotated[
        str | None,
        typer.Option(help="User id prefix (default: new users each run; an earlier run's prefix retrains its users)."),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model (default: PERSONA_MODEL_BASE, i.e. smollm2-135m).")
    ] = None,
    prompt: Annotated[str, typer.Option(help="The prompt answered side by side at the end.")] = "",
) -> None:
    """The whole loop on the embedded stack: simulated users -> ingest -> buffers -> training -> gate -> serving."""
    from pipeline.demo.run import DEFAULT_PROMPT, DemoOptions, run

    opts = DemoOptions(users, events, steps, seed, prefix, base, prompt or DEFAULT_PROMPT)
    run(opts, console=console)
