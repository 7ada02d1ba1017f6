"""The Responses stream relay (``passthrough._Responses``) when the engine breaks off: the
stream ends as the Responses streaming API ends one, with an ``error`` event, read by
the official openai client. In-process control plane; the engine is a few lines of
aiohttp that cut the stream at a chosen event (the simulator has no such knob)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from tests.controlplane import cp_testing as t

EVENTS = [{"type": "response.created", "sequence_number": 0,
           "response": {"id": "resp_engine1", "object": "response", "status": "in_progress",
                        "model": t.MODEL, "output": []}},
          {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m",
           "output_index": 0, "content_index": 0, "delta": "Hel"}]


async def _cut_stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for e in EVENTS:
        await resp.write(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode())
    request.transport.close()  # type: ignore[union-attr]
    return resp


async def _healthy(_request: web.Request) -> web.Response:
    return web.json_response({})


@contextlib.asynccontextmanager
async def _engine() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/responses", _cut_stream)
    app.router.add_get("/health", _healthy)
    async with t.served(app) as url:
        yield url


async def test_a_responses_stream_the_engine_cut_ends_with_an_error_event() -> None:
    async with _engine() as url:
        s = t.settings(upstreams=[{"name": "cut", "url": url, "models": [t.MODEL],
                                   "tasks": ["responses"]}])
        async with t.running(s) as cp:
            async with aiohttp.ClientSession() as http, http.post(
                    f"{cp.url}/v1/responses", headers={"Authorization": f"Bearer {t.KEY_A}"},
                    json={"model": t.MODEL, "input": "Hi", "stream": True}) as r:
                raw = await r.read()
            async with cp.client() as c:
                stream = await c.responses.create(model=t.MODEL, input="Hi", stream=True)
                seen = [event async for event in stream]
    last = raw.strip().split(b"\n\n")[-1].split(b"\n")
    assert last[0] == b"event: error", raw
    error = json.loads(last[1].removeprefix(b"data: "))
    assert error["type"] == "error" and error["code"] == "stream_interrupted"
    assert error["sequence_number"] == 2 and error["message"] and "error" not in error
    # the SDK sees the engine's events, then the error event, typed
    assert [e.type for e in seen] == ["response.created", "response.output_text.delta",
                                      "error"]
    assert seen[-1].code == "stream_interrupted"  # type: ignore[union-attr]
