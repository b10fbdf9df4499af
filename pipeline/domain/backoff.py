"""Capped exponential backoff with full jitter (the AWS Architecture Blog's "full jitter"): pure arithmetic.

Used by the long-running processes to wait between retries of a transient error of a dependency, so that many
processes that lost the same server do not all come back at the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``next()`` is the wait before retry number ``attempt`` (1, 2, ...): uniform in
    ``[ceiling / 2, ceiling]`` with ``ceiling = min(cap_s, initial_s * 2 ** (attempt - 1))``.

    Half of the ceiling is kept as a floor so that a retry never hammers the dependency right away; the other half
    is jitter. ``reset()`` after a success."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.cap_s < self.initial_s:
            raise ValueError(f"need 0 < initial_s <= cap_s, got {self.initial_s} and {self.cap_s}")

    def ceiling(self) -> float:
        """The largest wait of the current attempt."""
        return min(self.cap_s, self.initial_s * 2 ** max(0, self.attempt - 1))

    def next(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        self.attempt += 1
        top = self.ceiling()
        return self.rng.uniform(top / 2, top)

    def reset(self) -> None:
        self.attempt = 0
