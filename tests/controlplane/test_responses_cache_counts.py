"""An engine's ``/v1/responses`` usage in the response cache (``responses_cache.entry``):
each count passes the engine's rule (``usage.count_of``) or the answer is not stored, and
the client gets it all the same, whole or streamed. A count the engine wrote as a string
or a fraction was read with ``int()``: a 500 (a stream cut mid-way), or stored and
counted as cache-hit tokens on every later hit although billing had refused it."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.core import responses_cache
from tests.controlplane import cp_testing as t
from tests.controlplane.test_stream_key_mask import RememberingCache

BAD_COUNTS = ["x", "123456", 5.5, -1, [1], {"n": 1}, True, 10**30, float("nan")]


def _response(usage: Any, **fields: Any) -> dict[str, Any]:
    return {"id": "resp_e1", "object": "response", "status": "completed", "model": t.MODEL,
            "output": [{"type": "message", "role": "assistant", "id": "msg_e1",
                        "content": [{"type": "output_text", "text": "hi"}]}],
            "usage": usage, **fields}


@pytest.mark.parametrize("bad", BAD_COUNTS)
@pytest.mark.parametrize("where", ["input_tokens", "output_tokens", "total_tokens",
                                   "input_tokens_details", "output_tokens_details"])
def test_an_answer_with_a_count_that_is_none_is_not_stored(where: str, bad: Any) -> None:
    usage: dict[str, Any] = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    if where.endswith("_details"):
        usage[where] = {"cached_tokens": bad, "reasoning_tokens": bad}
    else:
        usage[where] = bad
    assert responses_cache.entry(_response(usage)) is None


def test_whole_counts_are_stored_as_the_engine_wrote_them() -> None:
    usage = {"input_tokens": 3.0, "output_tokens": 2, "total_tokens": None,
             "input_tokens_details": {"cached_tokens": 1}, "output_tokens_details": None}
    entry = responses_cache.entry(_response(usage))
    assert entry is not None
    assert entry["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert isinstance(entry["usage"]["prompt_tokens"], int)


@pytest.mark.parametrize("fields", [
    {"status": "incomplete", "incomplete_details": "max_output_tokens"},
    {"status": "incomplete", "incomplete_details": ["max_output_tokens"]},
    {"output": 5}, {"output": [{"type": "message", "content": 5}]},
    {"output": "hi"}])
def test_an_answer_of_another_shape_is_not_stored(fields: dict[str, Any]) -> None:
    assert responses_cache.entry(_response({"input_tokens": 1}, **fields)) is None
    assert responses_cache.entry(_response("x")) is None


def _engine(usage: Any) -> web.Application:
    """A Responses engine answering ``usage``, whole or as the event stream."""
    async def responses(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        done = _response(usage)
        if not body.get("stream"):
            return web.json_response(done)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n, (kind, payload) in enumerate([
                ("response.created", {"response": {**done, "status": "in_progress",
                                                   "output": [], "usage": None}}),
                ("response.output_text.delta", {"item_id": "msg_e1", "output_index": 0,
                                                "content_index": 0, "delta": "hi"}),
                ("response.completed", {"response": done})]):
            data = {**payload, "type": kind, "sequence_number": n}
            await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/health", health)
    return app


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", ["x", "123456", 5.5])
async def test_the_client_gets_the_answer_and_the_cache_keeps_nothing(
        bad: Any, stream: bool) -> None:
    cache = RememberingCache()
    usage = {"input_tokens": bad, "output_tokens": 1, "total_tokens": 1}
    async with t.served(_engine(usage)) as url:
        s = t.settings(upstreams=[{"name": "e", "url": url, "models": [t.MODEL],
                                   "tasks": ["responses"]}])
        async with t.running(s, cache=cache) as cp, aiohttp.ClientSession() as http:
            async with http.post(cp.url + "/v1/responses",
                                 headers={"Authorization": f"Bearer {t.KEY_A}"},
                                 json={"model": t.MODEL, "input": "Hi", "store": False,
                                       "stream": stream}) as r:
                assert r.status == 200, await r.text()
                text = (await r.read()).decode()
    if stream:
        assert "event: response.completed" in text and "event: error" not in text
    else:
        assert json.loads(text)["output"][0]["content"][0]["text"] == "hi"
    assert cache.stored == {}
