"""Failover that holds (issue 17), through a real control plane and the openai client:
fallback models only within the tenant's allow-list, a fallback at run time when every
backend of the model failed before its first byte (said in ``x-synapse-fallback`` and
never cached), a stream that breaks before its first chunk retried like any request,
and the config errors that used to be tracebacks or silent surprises."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pydantic
import pytest

from controlplane import config
from tests.controlplane import cp_testing as t
from tests.controlplane.test_proxy import ScriptedCache

MSGS = [{"role": "user", "content": "hi"}]
BIG = "big-model"


def with_fallback(*upstreams: Any, **extra: Any) -> config.ControlPlaneSettings:
    return t.settings(models=[{"name": t.MODEL, "aliases": ["llama"], "fallbacks": [BIG]},
                              {"name": BIG, "aliases": ["big"]}],
                      upstreams=list(upstreams), **extra)


async def _until_unhealthy(cp: t.RunningCP, key: str) -> None:
    for _ in range(400):
        if any(b.key == key and why for b, why in cp.services.registry.all_backends()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} was never probed unhealthy")


async def test_a_fallback_the_tenant_may_not_use_is_skipped() -> None:
    async with t.backends(("big", "ok")) as (big,):
        s = with_fallback(t.upstream("small", "http://127.0.0.1:9"),
                          t.upstream("big", big.url, [BIG]),
                          auth={"tenants": [
                              {"name": "a", "keys": [t.KEY_A], "allowed_models": ["llama"]},
                              {"name": "b", "keys": [t.KEY_B]}]})
        async with t.running(s) as cp:
            await _until_unhealthy(cp, "static/small")
            a, b = cp.client(t.KEY_A), cp.client(t.KEY_B)
            with pytest.raises(openai.InternalServerError) as refused:
                await a.chat.completions.create(model="llama", messages=MSGS)
            assert refused.value.status_code == 503
            assert f"tried: {t.MODEL})" in refused.value.message
            assert not big.bodies, "tenant a may not use the fallback model"
            raw = await b.chat.completions.with_raw_response.create(model="llama",
                                                                    messages=MSGS)
            assert raw.headers["x-synapse-fallback"] == f"{t.MODEL}->{BIG}"
            assert raw.parse().choices[0].message.content == "hello from big"
            await a.close()
            await b.close()


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses", "/tokenize"])
async def test_a_fallback_the_tenant_may_not_use_is_skipped_on_every_path(path: str) -> None:
    """Chat left out the fallbacks a tenant's allow-list refuses; the other paths routed
    to them (helper-92, reading)."""
    async with t.backends(("big", "ok")) as (big,):
        s = with_fallback(t.upstream("small", "http://127.0.0.1:9"),
                          t.upstream("big", big.url, [BIG]),
                          auth={"tenants": [
                              {"name": "a", "keys": [t.KEY_A], "allowed_models": ["llama"]}]})
        body = {"model": "llama", "max_tokens": 8, "messages": MSGS, "input": "hi",
                "prompt": "hi"}
        async with t.running(s) as cp:
            await _until_unhealthy(cp, "static/small")
            async with aiohttp.ClientSession(headers={
                    "Authorization": f"Bearer {t.KEY_A}"}) as session:
                async with session.post(f"{cp.url}{path}", json=body) as resp:
                    text = await resp.text()
                    assert resp.status == 503, text
                    assert "x-synapse-fallback" not in resp.headers
                    assert BIG not in text


@pytest.mark.parametrize("stream", [False, True])
async def test_when_every_backend_of_the_model_fails_the_fallback_serves(stream: bool) -> None:
    cache = ScriptedCache(hit_for="never asked")
    async with t.backends(("one", "500"), ("two", "500"), ("big", "ok")) as (one, two, big):
        s = with_fallback(t.upstream("one", one.url), t.upstream("two", two.url),
                          t.upstream("big", big.url, [BIG]))
        async with t.running(s, cache) as cp:
            client = cp.client()
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", messages=MSGS, stream=stream, temperature=0)
            assert raw.status_code == 200
            assert raw.headers["x-synapse-fallback"] == f"{t.MODEL}->{BIG}"
            assert raw.headers["x-synapse-backend"] == "static/big"
            answer = raw.parse()
            if stream:
                text = "".join([c.choices[0].delta.content or "" async for c in answer
                                if c.choices])
            else:
                text = answer.choices[0].message.content
            assert text == "hello from big"
            assert len(one.bodies) == len(two.bodies) == 1, "each primary tried once"
            assert json.loads(big.bodies[-1])["model"] == BIG
            assert cache.stored == [], "a fallback model's answer is not the model's"
            served = cp.services.metrics.fallbacks.labels(t.MODEL, BIG)._value.get()
            assert served == 1
            # The same answer asked of the fallback model itself is its own: stored.
            await client.chat.completions.create(model="big", messages=MSGS, temperature=0)
            assert len(cache.stored) == 1
            await client.close()


async def test_a_stream_that_breaks_before_its_first_chunk_is_retried() -> None:
    async with t.backends(("empty", "empty"), ("good", "ok")) as (empty, good):
        s = t.round_robin(empty, good)
        async with t.running(s) as cp:
            client = cp.client()
            for _ in range(4):                  # round robin: each starts once or more
                stream = await client.chat.completions.create(model="llama", messages=MSGS,
                                                              stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
                assert text == "hello from good"
            assert empty.bodies, "the empty stream was tried"
            retries = cp.services.metrics.upstream_retries.labels(t.MODEL, "stream")
            assert retries._value.get() == len(empty.bodies)
            await client.close()


@pytest.mark.parametrize(("sections", "field", "says"), [
    ({"upstreams": [t.upstream("x", "http://127.0.0.1:1"), t.upstream("x", "http://h:2")]},
     "upstreams[1].name", "already the name of upstreams[0]"),
    ({"models": [{"name": "a", "fallbacks": ["b"]}, {"name": "b", "aliases": ["bee"],
                                                     "fallbacks": ["a"]}]},
     "models[0].fallbacks", "a cycle: a -> b -> a"),
    ({"models": [{"name": "a", "fallbacks": ["a"]}]}, "models[0].fallbacks", "a -> a"),
    ({"models": [{"name": "a", "fallbacks": ["nowhere"]}]}, "models[0].fallbacks",
     "'nowhere' is no model"),
    ({"upstreams": [{**t.upstream("x", "http://h:1"), "model_names": {"other": "o:1"}}]},
     "model_names", "'other' is not one of this upstream's models"),
])
def test_config_mistakes_are_errors_naming_the_field(sections: dict[str, Any], field: str,
                                                     says: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        t.settings(**sections)
    assert field in str(info.value) and says in str(info.value)


def test_fallbacks_to_models_an_upstream_serves_are_known() -> None:
    s = t.settings(models=[{"name": "a", "fallbacks": ["served-only"]}],
                   upstreams=[t.upstream("x", "http://h:1", ["served-only"])])
    assert s.models[0].fallbacks == ["served-only"]
