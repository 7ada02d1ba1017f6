"""/v1/messages over backends that only speak chat completions (translated), when they
fail: retries before the first byte, and a stream broken mid-way ending in Anthropic's
error event, read by the official anthropic client; the middleware's own errors on these
paths in Anthropic's shape; ``count_tokens``, by an engine (the simulator) and estimated.
In-process control plane, the scriptable FakeBackend (the simulator has no knob for a cut
stream at a chosen chunk)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web

from controlplane.core import anthropic_request, tokenization
from simulator import app as sim_app
from simulator import config as sim_config
from tests.controlplane import cp_testing as t

ASK = {"model": "llama", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}


def _client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=t.KEY_A, max_retries=0, timeout=20)


async def test_a_failing_backend_is_retried_before_the_first_byte() -> None:
    async with t.backends(("bad", "500"), ("good", "ok")) as (bad, good):
        s = t.round_robin(bad, good)
        async with t.running(s) as cp, _client(cp.url) as c:
            for _ in range(2):      # round robin: one of the two starts on the bad one
                raw = await c.messages.with_raw_response.create(**ASK)
                assert raw.headers["x-synapse-backend"] == "static/good"
                message = await raw.parse()
                assert message.content[0].text == "hello from good"  # type: ignore[union-attr]
                assert message.stop_reason == "end_turn"
    assert bad.bodies and all(b'"messages"' in body for body in bad.bodies)


async def test_a_stream_broken_mid_way_ends_with_an_anthropic_error_event() -> None:
    async with t.backends(("cut", "break")) as (cut,):
        s = t.settings(upstreams=[t.upstream("cut", cut.url)])
        async with t.running(s) as cp, _client(cp.url) as c:
            with pytest.raises(anthropic.APIStatusError) as err:
                async with c.messages.stream(**ASK) as stream:
                    async for _ in stream:
                        pass
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error" and "broke off" in body["error"]["message"]


async def test_no_backend_is_an_anthropic_overloaded_error() -> None:
    s = t.settings(upstreams=[t.upstream("none", "http://127.0.0.1:9", models=["other"])],
                   models=[{"name": t.MODEL, "aliases": ["llama"]}, {"name": "other"}])
    async with t.running(s) as cp, _client(cp.url) as c:
        with pytest.raises(anthropic.InternalServerError) as err:
            await c.messages.create(**ASK)
    assert err.value.status_code == 503
    assert err.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


# -- errors the middleware raises itself, under /v1/messages ------------------------------


def _anthropic_error(status: int, body: bytes, headers: Any, kind: str) -> None:
    data = json.loads(body)
    assert data["type"] == "error" and data["error"]["type"] == kind, data
    assert data["request_id"] == headers["request-id"] == headers["x-request-id"]
    assert "code" not in data["error"] and status >= 400


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_no_route_wrong_method_and_undecodable_body_are_anthropic_shaped(
        fast_lane: bool) -> None:
    async with t.backends(("good", "ok")) as (good,):
        s = t.settings(upstreams=[t.upstream("good", good.url)],
                       http={"fast_lane": fast_lane})
        async with t.running(s) as cp, aiohttp.ClientSession() as http:
            key = {"x-api-key": t.KEY_A, "anthropic-version": "2023-06-01"}
            async with http.get(f"{cp.url}/v1/messages", headers=key) as r:
                assert r.status == 405 and "POST" in r.headers["Allow"]
                _anthropic_error(r.status, await r.read(), r.headers, "invalid_request_error")
            async with http.post(f"{cp.url}/v1/messages/batches", json={}, headers=key) as r:
                assert r.status == 404
                _anthropic_error(r.status, await r.read(), r.headers, "not_found_error")
            async with http.post(f"{cp.url}/v1/messages", data=b"{not gzip", headers={
                    **key, "Content-Type": "application/json",
                    "Content-Encoding": "gzip"}) as r:
                assert r.status == 400
                _anthropic_error(r.status, await r.read(), r.headers, "invalid_request_error")
            # other paths keep the OpenAI envelope, a look-alike prefix included
            async with http.post(f"{cp.url}/v1/messagesx", json={}, headers=key) as r:
                assert (await r.json())["error"]["code"] == "unknown_route"


async def test_the_sdk_reads_an_unserved_messages_path_as_not_found() -> None:
    async with t.running(t.settings()) as cp, _client(cp.url) as c:
        with pytest.raises(anthropic.NotFoundError) as err:
            await c.messages.batches.list()
    body = err.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "not_found_error"
    assert err.value.request_id == body["request_id"]


# -- count_tokens -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _simulator(*tasks: str) -> AsyncIterator[str]:
    app = sim_app.build(sim_config.SimulatorSettings(model=t.MODEL, tasks=list(tasks),
                                                     time_scale=0))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


CONVERSATION: dict[str, Any] = {
    "model": "llama", "system": "You answer in French.",
    "messages": [{"role": "user", "content": "What is a GPU?"},
                 {"role": "assistant", "content": "Un processeur graphique."},
                 {"role": "user", "content": [{"type": "text", "text": "And a TPU?"}]}]}


async def test_count_tokens_is_the_engines_count_of_the_prompt_a_message_is_billed() -> None:
    async with _simulator("generate", "tokenize") as url:
        s = t.settings(upstreams=[{"name": "sim", "url": url, "models": [t.MODEL],
                                   "tasks": ["generate", "tokenize"]}])
        async with t.running(s) as cp, _client(cp.url) as c:
            raw = await c.messages.with_raw_response.count_tokens(**CONVERSATION)
            counted = await raw.parse()
            message = await c.messages.create(max_tokens=4, **CONVERSATION)
    assert raw.headers["x-synapse-count"] == "engine"
    assert counted.input_tokens == message.usage.input_tokens > 10


async def test_count_tokens_without_a_tokenizing_backend_is_the_routers_estimate() -> None:
    async with t.backends(("good", "ok")) as (good,):
        s = t.settings(upstreams=[t.upstream("good", good.url)])    # generate only
        async with t.running(s) as cp, _client(cp.url) as c, anthropic.AsyncAnthropic(
                base_url=cp.url, api_key=t.KEY_B, max_retries=0) as other:
            first = await c.messages.with_raw_response.count_tokens(**CONVERSATION)
            for _ in range(3):      # another tenant's traffic changes nothing
                await other.messages.create(max_tokens=4, **CONVERSATION)
            again = await (await c.messages.with_raw_response.count_tokens(
                **CONVERSATION)).parse()
    assert first.headers["x-synapse-count"] == "estimate"
    chat = anthropic_request.to_chat({**CONVERSATION, "max_tokens": 1})["messages"]
    expected = len(tokenization.APPROXIMATION.chat_ids(chat))
    assert (await first.parse()).input_tokens == again.input_tokens == expected
    assert not any(b'"count_tokens"' in b for b in good.bodies)


async def test_count_tokens_errors_are_anthropic_shaped() -> None:
    async with t.running(t.settings()) as cp, _client(cp.url) as c:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await c.messages.count_tokens(model="llama", messages="hi")  # type: ignore[arg-type]
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await c.messages.count_tokens(model="no-such-model",
                                          messages=[{"role": "user", "content": "hi"}])
        async with anthropic.AsyncAnthropic(base_url=cp.url, api_key="sk-wrong",
                                            max_retries=0) as wrong:
            with pytest.raises(anthropic.AuthenticationError):
                await wrong.messages.count_tokens(
                    model="llama", messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages" in bad.value.message
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


# -- the translated mode's stream ---------------------------------------------------------


async def test_a_translated_streams_error_event_carries_the_request_id() -> None:
    async with t.backends(("cut", "break")) as (cut,):
        s = t.settings(upstreams=[t.upstream("cut", cut.url)])
        async with t.running(s) as cp, _client(cp.url) as c:
            with pytest.raises(anthropic.APIStatusError) as err:
                async with c.messages.stream(
                        **ASK, extra_headers={"x-request-id": "req-cut-7"}) as stream:
                    async for _ in stream:
                        pass
    assert err.value.body["request_id"] == "req-cut-7"  # type: ignore[index]


async def test_a_stream_flag_that_is_not_a_boolean_is_refused_in_translated_mode() -> None:
    async with t.backends(("good", "ok")) as (good,):
        s = t.settings(upstreams=[t.upstream("good", good.url)])
        async with t.running(s) as cp, _client(cp.url) as c:
            with pytest.raises(anthropic.BadRequestError) as err:
                await c.messages.create(**ASK, extra_body={"stream": "yes"})
    assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "stream" in err.value.message and not good.bodies
