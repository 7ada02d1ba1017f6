"""/v1/messages over backends that only speak chat completions (translated), when they
fail: retries before the first byte, and a stream broken mid-way ending in Anthropic's
error event, read by the official anthropic client. In-process control plane, the
scriptable FakeBackend (the simulator has no knob for a cut stream at a chosen chunk)."""

from __future__ import annotations

import anthropic
import pytest

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
