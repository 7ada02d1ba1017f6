"""Proxying: retries before the first byte, broken streams, client aborts, the cache seam."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from controlplane.core import cache_port
from tests.controlplane import cp_testing as t
from tests.harness import wait_until

MSGS = [{"role": "user", "content": "hi"}]


async def test_retries_the_next_backend_on_5xx_and_connect_errors() -> None:
    async with t.backends(("bad", "500"), ("good", "ok"), ("dead", "ok")) as (bad, good, dead):
        s = t.settings(upstreams=[t.upstream("bad", bad.url), t.upstream("dead", dead.url),
                                  t.upstream("good", good.url)],
                       registry={"upstream_probe_interval_s": 3600})
        async with t.running(s) as cp:
            await asyncio.to_thread(wait_until, lambda: dead.health_hits > 0, 10,
                                    "the first probe round")
            await dead.stop()  # ... then one dies between probes: connection refused
            client = cp.client()
            for _ in range(6):
                raw = await client.chat.completions.with_raw_response.create(
                    model="llama", messages=MSGS)
                assert raw.parse().choices[0].message.content == "hello from good"
                assert raw.headers["x-synapse-backend"] == "static/good"
            retries = cp.services.metrics.upstream_retries
            assert retries.labels(t.MODEL, "5xx")._value.get() >= 1
            assert retries.labels(t.MODEL, "connect")._value.get() >= 1
            await client.close()


async def test_a_stream_broken_mid_way_ends_with_an_error_event() -> None:
    async with t.backends(("cut", "break")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("cut", b.url)])) as cp:
            client = cp.client()
            stream = await client.chat.completions.create(model="llama", messages=MSGS,
                                                          stream=True)
            got = []
            with pytest.raises(openai.APIError, match=r"broke off|before"):
                async for chunk in stream:
                    got.append(chunk)
            assert got, "the chunks before the break reached the client"
            await client.close()


async def test_client_disconnect_cancels_the_upstream_request() -> None:
    async with t.backends(("slow", "slow")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("slow", b.url)])) as cp:
            async with aiohttp.ClientSession() as s:
                resp = await s.post(f"{cp.url}/v1/chat/completions",
                                    json={"model": "llama", "messages": MSGS, "stream": True},
                                    headers={"Authorization": f"Bearer {t.KEY_A}"})
                await resp.content.readline()
                resp.close()  # the client goes away mid-stream
            await asyncio.to_thread(wait_until, lambda: b.cancelled == 1, 10,
                                    "the backend to see its request cancelled")
            ledger = cp.services.ledger.load("static/slow")
            await asyncio.to_thread(wait_until, lambda: ledger.in_flight == 0, 10,
                                    "the ledger to drop the aborted request")


@dataclasses.dataclass
class ScriptedCache:
    """A ResponseCache behind the seam: hits for one question, records stores."""

    hit_for: str
    stored: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)

    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        last = request.body["messages"][-1]["content"]
        if last == self.hit_for:
            answer = {"id": "cached", "object": "chat.completion", "created": 1,
                      "model": request.model,
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "from cache"}}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
            return cache_port.CacheDecision(
                "hit-semantic", cache_port.CacheHit("semantic", answer, 0.97, 0.93))
        return cache_port.CacheDecision("miss", may_store=True)

    def store(self, decision: cache_port.CacheDecision, response: Mapping[str, Any]) -> None:
        self.stored.append(response)

    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        return (0, 0)

    async def close(self) -> None:
        return None


async def test_cache_hits_are_answered_and_complete_misses_stored() -> None:
    cache = ScriptedCache(hit_for="cached question")
    async with t.backends(("one", "ok"), ("cut", "break")) as (b, cut):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)]), cache) as cp:
            client = cp.client()
            q = [{"role": "user", "content": "cached question"}]
            raw = await client.chat.completions.with_raw_response.create(model="llama",
                                                                         messages=q)
            assert raw.parse().choices[0].message.content == "from cache"
            assert raw.headers["x-synapse-cache"] == "hit-semantic"
            assert raw.headers["x-synapse-cache-similarity"] == "0.9700"
            assert raw.headers["x-synapse-cache-score"] == "0.9300"
            assert not b.bodies, "a hit never reaches a backend"
            stream = await client.chat.completions.create(
                model="llama", messages=q, stream=True,
                stream_options={"include_usage": True})   # a usage chunk only if asked
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
                == "from cache"
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5

            await client.chat.completions.create(model="llama", messages=MSGS)
            stream = await client.chat.completions.create(model="llama", messages=MSGS,
                                                          stream=True)
            assert [c async for c in stream]
            assert [s["choices"][0]["message"]["content"] for s in cache.stored] == \
                ["hello from one", "hello from one"]
            await client.close()
        s = t.settings(upstreams=[t.upstream("cut", cut.url)])
        async with t.running(s, cache) as cp:
            client = cp.client()
            stream = await client.chat.completions.create(model="llama", messages=MSGS,
                                                          stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
            assert len(cache.stored) == 2, "a truncated stream is never stored"
            await client.close()


async def test_a_stream_silent_longer_than_the_idle_timeout_is_cut() -> None:
    async with t.backends(("slow", "slow")) as (b,):
        s = t.settings(upstreams=[t.upstream("slow", b.url)],
                       http={"upstream_idle_timeout_s": 0.1, "upstream_first_byte_timeout_s": 5})
        async with t.running(s) as cp:
            client = cp.client()
            stream = await client.chat.completions.create(model="llama", messages=MSGS,
                                                          stream=True)
            with pytest.raises(openai.APIError, match="broke off"):
                async for _ in stream:
                    pass
            await client.close()


FINGERPRINT = "vllm-0.32.0-f7bfd0d0"


class VllmStreams(t.FakeBackend):
    """Streams as vLLM does: its ``system_fingerprint`` on the finish chunk, or — when
    usage is asked — on the usage chunk alone (``cut`` mode: the stream breaks right
    after its finish chunk)."""

    async def _stream(self, request: web.Request, body: dict[str, Any], text: str,
                      chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 1, "model": body["model"]}

        def choice(piece: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, **({"delta": {"content": piece}} if chat else {"text": piece}),
                    "logprobs": None, "finish_reason": finish}

        async def send(chunk: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({**head, "choices": [choice(text, None)]})
        finish = {**head, "choices": [choice("", "stop")]}
        await send(finish if asked else {**finish, "system_fingerprint": FINGERPRINT})
        if self.mode == "cut":
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if asked:
            await send({**head, "choices": [], "system_fingerprint": FINGERPRINT,
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                  "total_tokens": 8}})
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_client_that_did_not_ask_for_usage_gets_the_fingerprint_where_vllm_puts_it(
        fast_lane: bool) -> None:
    """Synapse asks the engine for usage the client did not ask for; vLLM then puts its
    fingerprint on the usage chunk, and dropping that chunk lost it (probe finding)."""
    ok, cut = VllmStreams("ok"), VllmStreams("cut", "cut")
    for b in (ok, cut):
        await b.start()
    try:
        s = t.settings(upstreams=[t.upstream("ok", ok.url)], http={"fast_lane": fast_lane})
        async with t.running(s) as cp:
            client = cp.client()
            chunks = [c async for c in await client.chat.completions.create(
                model="llama", messages=MSGS, stream=True)]
            assert json.loads(ok.bodies[-1])["stream_options"] == {"include_usage": True}
            assert [c.system_fingerprint for c in chunks] == [None, FINGERPRINT]
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert all(c.usage is None for c in chunks)
            texts = [c async for c in await client.completions.create(
                model="llama", prompt="hi", stream=True)]
            assert [c.system_fingerprint for c in texts] == [None, FINGERPRINT]
            asked = [c async for c in await client.chat.completions.create(
                model="llama", messages=MSGS, stream=True,
                stream_options={"include_usage": True})]     # vLLM's form, as it came
            assert [(c.system_fingerprint, c.usage is not None) for c in asked] == [
                (None, False), (None, False), (FINGERPRINT, True)]
        s = t.settings(upstreams=[t.upstream("cut", cut.url)], http={"fast_lane": fast_lane})
        async with t.running(s) as cp:
            client = cp.client()
            got = []
            with pytest.raises(openai.APIError, match="broke off"):
                async for chunk in await client.chat.completions.create(
                        model="llama", messages=MSGS, stream=True):
                    got.append(chunk)
            assert [c.choices[0].finish_reason for c in got] == [None, "stop"]
    finally:
        for b in (ok, cut):
            await b.stop()
