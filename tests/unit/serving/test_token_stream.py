"""The token hand-over between the engine thread and a stream's event loop (`pipeline.serving.server`)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.serving.engine import Generation, Request
from pipeline.serving.server import AsyncTokenStream, _put_all, _Tokens


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
                batch: list[tuple[_Tokens, int | None, bool]] = [(tokens, 10 + step, step == 4)]
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
