"""/v1/messages over backends that only speak chat completions (translated), when they
fail: retries before the first byte, and a stream broken mid-way ending in Anthropic's
error event, read by the official anthropic client; the middleware's own errors on these
paths in Anthropic's shape; ``count_tokens``, by an engine (the simulator) and estimated.
In-process control plane, the scriptable FakeBackend (the simulator has no knob for a cut
stream at a chosen chunk)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import anthropic
import pytest

from controlplane.core import anthropic_request, tokenization
from simulator import app as sim_app
from simulator import config as sim_config
from synapse_common import tokens as tok
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
            # a path that is under /v1/messages once normalised is Anthropic's too
            for path in ("//v1/messages/x", "/v1//messages/x", "/v1/./messages/x"):
                async with http.post(f"{cp.url}{path}", json={}, headers=key) as r:
                    assert r.status == 404, path
                    _anthropic_error(r.status, await r.read(), r.headers, "not_found_error")
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
    async with t.served(app) as url:
        yield url


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


async def test_count_tokens_refused_by_the_engine_says_no_count_and_stream_is_checked(
        ) -> None:
    async with t.backends(("no-tokenize", "ok")) as (engine,):     # /tokenize: its 404
        s = t.settings(upstreams=[{"name": "engine", "url": engine.url, "models": [t.MODEL],
                                   "tasks": ["tokenize"]}])
        async with t.running(s) as cp, aiohttp.ClientSession() as http:
            key = {"x-api-key": t.KEY_A, "anthropic-version": "2023-06-01"}
            async with http.post(f"{cp.url}/v1/messages/count_tokens", json=CONVERSATION,
                                 headers=key) as r:
                assert r.status == 404
                _anthropic_error(r.status, await r.read(), r.headers, "not_found_error")
                assert "x-synapse-count" not in r.headers       # nothing was counted
            async with http.post(f"{cp.url}/v1/messages/count_tokens", headers=key,
                                 json={**CONVERSATION, "stream": "yes"}) as r:
                assert r.status == 400      # as /v1/messages refuses it
                _anthropic_error(r.status, await r.read(), r.headers, "invalid_request_error")
                assert "stream" in (await r.json())["error"]["message"]
            async with http.post(f"{cp.url}/v1/messages/count_tokens", headers=key,
                                 json={**CONVERSATION, "stream": False}) as r:
                assert r.status == 404      # a boolean passes (and the engine refuses)


async def _until_down(cp: t.RunningCP, *keys: str) -> None:
    for _ in range(400):
        down = {b.key for b, why in cp.services.registry.all_backends() if why}
        if down >= set(keys):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{keys} were never probed down")


async def test_count_tokens_of_a_model_whose_tokenizers_are_down_is_an_error_not_a_guess(
        ) -> None:
    """While the model's own engines cannot count, the client hears so (503): neither the
    router's estimate nor a fallback model's engine, whose tokenizer counts another
    number, answers in their place."""
    async with _simulator("generate", "tokenize") as url:
        dead = "http://127.0.0.1:9"
        s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"], "fallbacks": ["big"]},
                               {"name": "big"}, {"name": "solo"}],
                       upstreams=[{"name": "small", "url": dead, "models": [t.MODEL],
                                   "tasks": ["generate", "tokenize"]},
                                  {"name": "lone", "url": dead, "models": ["solo"],
                                   "tasks": ["tokenize"]},
                                  {"name": "big", "url": url, "models": ["big"],
                                   "model_names": {"big": t.MODEL},     # the simulator's
                                   "tasks": ["generate", "tokenize"]}])
        async with t.running(s) as cp, _client(cp.url) as c:
            await _until_down(cp, "static/small", "static/lone")
            for model in ("llama", "solo"):
                with pytest.raises(anthropic.InternalServerError) as err:
                    await c.messages.count_tokens(**{**CONVERSATION, "model": model})
                assert err.value.status_code == 503, model
                assert err.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
                assert "x-synapse-count" not in err.value.response.headers
            served = await c.messages.with_raw_response.count_tokens(
                **{**CONVERSATION, "model": "big"})
            assert served.headers["x-synapse-count"] == "engine"    # the fallback is up


async def test_count_tokens_estimate_is_charged_to_the_tenants_share_of_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's count tokenizes on the event loop (a body of the default size limit
    held it about two seconds): its time goes into the tenant's charge
    (``core.loop_share``), as a generating request's tokenizing does."""
    chat_ids = tokenization.Approximate.chat_ids

    def slow(self: tokenization.Approximate, messages: Sequence[Mapping[str, Any]],
             *partition: int) -> tuple[int, ...]:
        time.sleep(0.1)
        return chat_ids(self, messages, *partition)
    monkeypatch.setattr(tokenization.Approximate, "chat_ids", slow)
    async with t.backends(("good", "ok")) as (good,):
        s = t.settings(upstreams=[t.upstream("good", good.url)])    # generate only
        async with t.running(s) as cp, _client(cp.url) as c:
            share = cp.services.loop_share
            charged: list[tuple[str, float]] = []
            charge = share.charge
            share.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value,misc]
            raw = await c.messages.with_raw_response.count_tokens(**CONVERSATION)
            assert raw.headers["x-synapse-count"] == "estimate"
            assert charged[-1][0] == "a" and charged[-1][1] >= 0.1, charged     # at its end
            assert share.rationed() == ["a"]        # its next request waits its turn


async def test_count_tokens_finds_nothing_another_tenant_sent_in_the_tokenizers_memo(
        ) -> None:
    """The approximation's memo of rendered messages is per tenant: a hit there, timed,
    told tenant a that tenant b had just sent that message (review 91 F2)."""
    secret = {"model": "llama", "system": "tenant b's own system prompt", "messages": [
        {"role": "user", "content": "tenant b's own question, sent a moment ago " * 20}]}
    chat = anthropic_request.to_chat({**secret, "max_tokens": 1})["messages"]
    rendered = {tok.render_chat([m], add_generation_prompt=False) for m in chat}
    long = {r for r in rendered if len(r) > tokenization.SHORT_MESSAGE}
    assert long and long != rendered    # a long message, a short one: both memos

    def held(tenant: str) -> set[str]:      # the long rendered messages a tenant's memo holds
        return {key.partition(":")[2]
                for _, key, _ in tokenization._long_messages.items(tenant)}

    def short_misses(tenant: str) -> int:   # short messages a tenant's memo had to tokenize
        memo: Any = tokenization._short_memo(tenant)
        return int(memo.cache_info().misses)
    async with t.backends(("good", "ok")) as (good,):
        s = t.settings(upstreams=[t.upstream("good", good.url)])    # predicted_ttft
        async with t.running(s) as cp, _client(cp.url) as c, anthropic.AsyncAnthropic(
                base_url=cp.url, api_key=t.KEY_B, max_retries=0) as other:
            await other.messages.create(max_tokens=4, **secret)     # tokenized: b's
            assert long <= held("b") and not long & held("a") and not short_misses("a")
            first = await c.messages.count_tokens(**secret)
            assert long <= held("a"), "b's messages answered a's count"
            assert short_misses("a") == len(rendered - long) + 1    # and the generation prompt
            again = await c.messages.count_tokens(**secret)
    assert first.input_tokens == again.input_tokens


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
