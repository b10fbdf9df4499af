"""Per-user I/O of a batch, several users at a time: a batch flow's database and object-store work is round trips,
not computation, and done one user after another it grew with the batch (256 users a wave)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def each(threads: int, items: list[T], fn: Callable[[T], R]) -> list[R | BaseException]:
    """``fn`` of each item, ``threads`` items at a time, in the items' order; an item whose call raised gets its
    exception as its result (the others go on). A BaseException that is not an Exception (an interrupt) is raised."""

    def one(item: T) -> R | BaseException:
        try:
            return fn(item)
        except Exception as e:
            return e

    if threads <= 1 or len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="flow-io") as pool:
        return list(pool.map(one, items))
