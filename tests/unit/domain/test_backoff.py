"""Capped exponential backoff with jitter."""

from __future__ import annotations

import random

import pytest

from pipeline.domain.backoff import Backoff


def test_waits_double_up_to_the_cap_with_jitter_in_the_upper_half():
    b = Backoff(0.5, 8.0, rng=random.Random(1))
    ceilings = []
    for _ in range(10):
        wait = b.next()
        top = b.ceiling()
        assert top / 2 <= wait <= top
        ceilings.append(top)
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next() <= 0.5


def test_jitter_spreads_the_waits():
    waits = {round(Backoff(1.0, 30.0, rng=random.Random(seed)).next(), 6) for seed in range(20)}
    assert len(waits) == 20


@pytest.mark.parametrize(("initial", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_bad_bounds_are_refused(initial, cap):
    with pytest.raises(ValueError):
        Backoff(initial, cap)
