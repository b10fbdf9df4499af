"""bench/serving_load.py's `--client-processes`: a point's requests split over client processes that start from one
time, against a small real SSE server; every request comes back filled in (status, chunk times, [DONE])."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from types import SimpleNamespace

import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from pipeline.config import ROOT
from tests.integration.helpers import free_port


async def _stream(_request: object) -> StreamingResponse:
    async def chunks():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield f'data: {{"text": "{i}"}}\n\n'.encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


def test_requests_split_over_client_processes_all_come_back_filled_in() -> None:
    sys.path.insert(0, str(ROOT / "bench"))  # spawned client processes import the script by this name
    import serving_load as bench

    port = free_port()
    app = Starlette(routes=[Route("/v1/completions", _stream, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    ctx = SimpleNamespace(args=argparse.Namespace(client_processes=2), clients=None)
    client = bench.Client("httpx", f"http://127.0.0.1:{port}", "key", 64, 30.0)
    reqs = [bench.Req(0.01 * i, -1, 4, 3, b"{}") for i in range(20)]
    try:
        timing, cpu = bench.drive_in_processes(ctx, client, "/v1/completions", reqs, 10.0)
    finally:
        if ctx.clients is not None:
            ctx.clients.shutdown()
        server.should_exit = True
    assert timing["client_processes"] == 2 and timing["unfinished"] == 0 and cpu > 0
    assert all(r.status == 200 and r.done and r.error is None and len(r.times) == 3 for r in reqs)
    # one start time: each request was sent no earlier than its scheduled time after t0
    assert all(r.sent >= timing["t0"] + r.at - 0.005 for r in reqs)
