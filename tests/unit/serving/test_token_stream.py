"""The token hand-over between the engine thread and a stream's event loop (`pipeline.serving.server`)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.serving.engine import Generation, Request
from pipeline.serving.server import AsyncTokenStream, _Holding, _LoopSink, _put_all, _Tokens


def _stream(loop: asyncio.AbstractEventLoop, released: list[int]) -> tuple[AsyncTokenStream, _Tokens]:
    tokens = _Tokens(loop)
    return AsyncTokenStream(lambda: released.append(1), tokens, Generation(0, Request([1]))), tokens


def test_tokens_from_another_thread_arrive_in_order_in_runs_and_the_end_releases_once():
    async def main() -> list[list[int]]:
        released: list[int] = []
        stream, tokens = _stream(asyncio.get_running_loop(), released)
        loop = asyncio.get_running_loop()

        def engine() -> None:  # as `Server._deliver`: one call_soon_threadsafe per step
            for step in range(5):
                batch: list[tuple[_Tokens, list[int], bool]] = [(tokens, [10 + step], step == 4)]
                loop.call_soon_threadsafe(_put_all, batch)

        threading.Thread(target=engine).start()
        runs = [run async for run in stream.runs()]
        assert released == [1]
        stream.close()  # closing again releases nothing more
        assert released == [1]
        return runs

    runs = asyncio.run(main())
    assert [t for run in runs for t in run] == [10, 11, 12, 13, 14]
    assert all(runs)


def test_a_disconnect_ends_the_tokens_and_silence_past_the_timeout_raises():
    async def main() -> None:
        released: list[int] = []
        stream, tokens = _stream(asyncio.get_running_loop(), released)
        tokens.put(7)
        stream.disconnect()
        tokens.put(8)  # after the end: never read
        assert [run async for run in stream.runs()] == [[7]]
        assert released == [1]

        quiet, _ = _stream(asyncio.get_running_loop(), released)
        with pytest.raises(TimeoutError):
            async for _ in quiet.runs(timeout_s=0.05):
                pass
        assert released == [1, 1]

        slow, slow_tokens = _stream(asyncio.get_running_loop(), released)
        loop = asyncio.get_running_loop()
        for i in range(4):  # a token every 0.03 s keeps a 0.05 s timeout from firing
            loop.call_later(0.03 * (i + 1), slow_tokens.put, i if i < 3 else None)
        assert [t async for run in slow.runs(timeout_s=0.05) for t in run] == [0, 1, 2]

    asyncio.run(main())


def _sinks(n: int) -> tuple[asyncio.AbstractEventLoop, list[_LoopSink]]:
    loop = asyncio.new_event_loop()
    return loop, [_LoopSink(loop, _Tokens(loop)) for _ in range(n)]


def _runs(batches: dict, sinks: list[_LoopSink]) -> list[tuple[int, list[int], bool]]:
    """What went out, as (stream index, run, finished)."""
    index = {id(s.tokens): i for i, s in enumerate(sinks)}
    return [(index[id(t)], run, fin) for batch in batches.values() for t, run, fin in batch]


def test_without_an_interval_every_token_goes_at_once():
    loop, sinks = _sinks(2)
    holding = _Holding(0.0)
    out = holding.route([(0, 5, False), (1, 6, False)], sinks, lambda held: {})
    assert _runs(out, sinks) == [(0, [5], False), (1, [6], False)]
    out = holding.route([(0, 7, True), (1, None, True)], sinks, lambda held: {})
    assert _runs(out, sinks) == [(0, [7], True), (1, [], True)]
    assert holding.held == {}
    loop.close()


def test_an_interval_holds_tokens_between_deliveries_first_and_last_at_once_order_kept():
    loop, sinks = _sinks(2)
    holding = _Holding(0.010)

    def alive(held: dict) -> dict:
        return dict.fromkeys(held, True)

    sent: list[tuple[int, list[int], bool]] = []
    # stream 0 runs 0.000 .. 0.032 s (a token every 4 ms, the last finishing it); stream 1 joins at 0.008 s
    for step in range(9):
        now = step * 0.004
        items: list[tuple[int, int | None, bool]] = [(0, 100 + step, step == 8)]
        if step >= 2:
            items.append((1, 200 + step, False))
        sent += _runs(holding.route(items, [sinks[g] for g, _, _ in items], alive, now=now), sinks)
    zero = [(run, fin) for i, run, fin in sent if i == 0]
    one = [run for i, run, _ in sent if i == 1]
    assert zero[0] == ([100], False)  # the first token at once
    assert zero[-1][1] is True  # the end at once, with what was held
    assert [t for run, _ in zero for t in run] == list(range(100, 109))  # every token, in order
    assert len(zero) < 9  # held tokens went together
    assert all(len(run) <= 3 for run, _ in zero)  # 10 ms at a token every 4 ms
    assert one == [[202], [203, 204, 205], [206, 207, 208]]
    assert holding.held == {}
    loop.close()


def test_a_held_stream_that_gets_no_token_goes_when_its_time_is_up_and_an_ended_one_is_dropped():
    loop, sinks = _sinks(3)
    holding = _Holding(0.010)
    gone: set[int] = set()

    def alive(held: dict) -> dict:
        return {g: g not in gone for g in held}

    holding.route([(0, 1, False), (1, 1, False), (2, 1, False)], sinks, alive, now=0.0)
    held = holding.route([(0, 2, False), (1, 2, False), (2, 2, False)], sinks, alive, now=0.004)
    assert held == {} and set(holding.held) == {0, 1, 2}
    gone.add(2)
    # stream 0 is preempted (no token); stream 1 keeps going; stream 2 ended (its request closed). Held streams
    # are looked at once an interval (the last look was at 0.004).
    out = holding.route([(1, 3, False)], [sinks[1]], alive, now=0.012)
    assert _runs(out, sinks) == [(1, [2, 3], False)]
    out = holding.route([], [], alive, now=0.015)
    assert _runs(out, sinks) == [(0, [2], False)]
    assert holding.held == {}
    loop.close()
