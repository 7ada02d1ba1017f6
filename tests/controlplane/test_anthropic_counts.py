"""``/v1/messages`` translated from a chat engine whose usage counts are not counts by
the engine's rule (``usage.count_of``): the client gets its Message, whole or streamed to
``message_stop``, with 0 where Anthropic's usage needs an integer, and the request is
billed from the control plane's estimate. A count read with ``int()`` made a 500 of a
whole answer and cut a stream without an error event."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.core import anthropic_response
from tests.controlplane import cp_testing as t
from tests.controlplane.test_access_log import access_lines

BAD_COUNTS = ["x", "123456", 5.5, -1, [1], True, 10**30, float("inf")]


@pytest.mark.parametrize("bad", BAD_COUNTS)
def test_a_count_that_is_none_shows_as_0_and_a_cache_count_is_left_out(bad: Any) -> None:
    assert anthropic_response.usage({"prompt_tokens": bad, "completion_tokens": bad}) == {
        "input_tokens": 0, "output_tokens": 0}
    assert anthropic_response.usage({"prompt_tokens": 9, "completion_tokens": 2,
                                     "prompt_tokens_details": {"cached_tokens": bad}}) == {
        "input_tokens": 9, "output_tokens": 2}


def test_whole_counts_pass_as_before() -> None:
    assert anthropic_response.usage({"prompt_tokens": 9.0, "completion_tokens": 2,
                                     "prompt_tokens_details": {"cached_tokens": 4}}) == {
        "input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 4}


def _engine(usage: dict[str, Any]) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "c1", "model": t.MODEL, "created": 1}
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "usage": usage,
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant",
                                                               "content": "hi"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        c = {**base, "object": "chat.completion.chunk"}
        for d in ({**c, "choices": [{"index": 0, "finish_reason": None,
                                     "delta": {"role": "assistant", "content": "hi"}}]},
                  {**c, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {**c, "choices": [], "usage": usage}):
            await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    return t.hosted_api(chat)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_client_gets_its_message_and_the_request_is_estimated(stream: bool) -> None:
    usage = {"prompt_tokens": "x", "completion_tokens": 1, "total_tokens": 2}
    async with t.served(_engine(usage)) as url:
        async with t.running(t.settings(upstreams=[t.hosted("e", url)])) as cp:
            with access_lines() as lines:
                async with aiohttp.ClientSession() as http, http.post(
                        cp.url + "/v1/messages",
                        headers={"x-api-key": t.KEY_A, "anthropic-version": "2023-06-01"},
                        json={"model": t.MODEL, "max_tokens": 5, "stream": stream,
                              "messages": [{"role": "user", "content": "Hi"}]}) as r:
                    assert r.status == 200, await r.text()
                    text = (await r.read()).decode()
    if stream:
        assert text.rstrip().endswith('data: {"type":"message_stop"}')
        assert '"usage":{"input_tokens":0,"output_tokens":1}' in text
    else:
        message = json.loads(text)
        assert message["content"] == [{"type": "text", "text": "hi"}]
        assert message["usage"] == {"input_tokens": 0, "output_tokens": 1}
    (line,) = lines
    assert line["usage_estimated"] is True and line["prompt_tokens"] > 0
