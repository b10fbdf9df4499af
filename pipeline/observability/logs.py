"""Logging setup for entry points (library code only calls logging.getLogger(__name__))."""

from __future__ import annotations

import logging


def setup(level: str | int = "INFO") -> None:
    """Configure the root logger once: one line per record, with time, level and logger name."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
    )
    for noisy in ("kafka", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
