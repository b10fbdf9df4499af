"""``python -m pipeline.cli``: the `persona` command (what the demo and the tests start processes with)."""

from pipeline.cli import main

main()
