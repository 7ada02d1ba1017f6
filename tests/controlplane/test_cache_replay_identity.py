"""A cache hit is a new answer in its own endpoint's stream form.

Found against a real vLLM 0.32: a hit, whole or replayed as a stream, gave back the first
answer's ``id`` and ``created`` (up to a TTL old), where a backend gives every answer a
new id and the time it answers; a chat stream replayed after a completions stream of the
same model took that stream's form (``"object": "text_completion"``, a ``text`` field and
``prompt_token_ids`` beside the delta), and the reverse; and a replay in the default form
carried no ``system_fingerprint`` at all, where vLLM puts it on the last chunk.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from controlplane import metrics as metrics_mod
from controlplane.adapters import l1
from controlplane.core import cache_port, response_cache, sse, stream_fold, stream_replay
from tests.controlplane import cp_testing as t
from tests.controlplane.test_cache_feedback import HI_ASK, judged_replica

PROMPT_ASK = dict(model="llama", temperature=0, prompt="Rivers (x) are", max_tokens=4)


async def sse_chunks(cp: t.RunningCP, path: str, body: dict[str, Any]
                     ) -> tuple[str, list[dict[str, Any]]]:
    """(the cache status, the stream's chunks) of a streamed request, as sent."""
    async with aiohttp.ClientSession() as s, s.post(
            f"{cp.url}{path}", json={**body, "stream": True},
            headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
        status = r.headers["x-synapse-cache"]
    return status, [orjson.loads(e) for e in sse.SSEParser().feed(raw) if e != sse.DONE]


async def test_every_hit_gets_a_fresh_id_and_created_and_feedback_still_finds_it(tmp_path):
    async with judged_replica(tmp_path, "ok") as (cp, _, cache, _):
        client = cp.client()
        ask = {**HI_ASK, "stream_options": {"include_usage": True}}
        status, live = await sse_chunks(cp, "/v1/chat/completions", ask)
        assert status == "miss" and live[0]["id"] == "cmpl-1"   # the stand-in's,
        assert {c["created"] for c in live} == {1}                # from long ago
        await cache.drain()
        before = int(time.time())
        whole = [await client.chat.completions.with_raw_response.create(**HI_ASK)
                 for _ in range(2)]
        status, replayed = await sse_chunks(cp, "/v1/chat/completions", ask)
        assert status == "hit-exact"
        assert [w.headers["x-synapse-cache"] for w in whole] == ["hit-exact"] * 2
        answers = [w.parse() for w in whole]
        ids = [a.id for a in answers] + [replayed[0]["id"]]
        assert len({"cmpl-1", *ids}) == 4, "a new id per answer"
        assert all(i.startswith("cmpl-") and len(i) > len("cmpl-") for i in ids)
        assert {c["id"] for c in replayed} == {replayed[0]["id"]}, "one id per stream"
        assert all(a.created >= before for a in answers)
        assert {c["created"] for c in replayed} == {replayed[0]["created"]}
        assert replayed[0]["created"] >= before
        # The feedback loop names a hit by its request id, not the answer's id.
        async with aiohttp.ClientSession() as s, s.post(
                f"{cp.url}/v1/cache/feedback",
                json={"request_id": whole[1].headers["x-request-id"], "wrong": True},
                headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
            assert r.status == 200 and (await r.json())["evicted"] is True


async def test_a_coalesced_follower_gets_an_id_of_its_own(tmp_path):
    """A request answered from an identical one in flight is a hit too: not the
    leader's id beside it."""
    async with judged_replica(tmp_path, "slow") as (cp, b, _, _):
        client = cp.client()
        both = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            **HI_ASK) for _ in range(2)))
        assert len(b.bodies) == 1
        assert sorted(r.headers["x-synapse-cache"] for r in both) == ["hit-exact", "miss"]
        leader, follower = sorted((r.parse() for r in both), key=lambda a: a.id != "cmpl-1")
        assert leader.id == "cmpl-1" and follower.id.startswith("cmpl-")
        assert follower.id != leader.id
        assert follower.choices[0].message.content == leader.choices[0].message.content


async def test_a_completions_hit_keeps_its_prefix_and_gets_a_new_id(tmp_path):
    async with judged_replica(tmp_path, "ok") as (cp, _, cache, _):
        client = cp.client()
        first = await client.completions.create(**PROMPT_ASK)
        await cache.drain()
        raw = await client.completions.with_raw_response.create(**PROMPT_ASK)
        assert raw.headers["x-synapse-cache"] == "hit-exact"
        again = raw.parse()
        assert again.id != first.id and again.id.startswith("cmpl-")
        assert again.choices[0].text == first.choices[0].text


async def test_a_messages_hit_gets_a_new_message_id(tmp_path):
    ask = {"model": "llama", "max_tokens": 16, "temperature": 0,
           "messages": [{"role": "user", "content": "What is a GPU?"}]}
    async with judged_replica(tmp_path, "ok") as (cp, _, cache, _):
        ids = []
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(f"{cp.url}/v1/messages", json=ask,
                                  headers={"x-api-key": t.KEY_A}) as r:
                    assert r.status == 200, await r.text()
                    ids.append(((await r.json())["id"], r.headers["x-synapse-cache"]))
                await cache.drain()
        assert [status for _, status in ids] == ["miss", "hit-exact", "hit-exact"]
        assert len({i for i, _ in ids}) == 3 and all(i.startswith("msg_") for i, _ in ids)


async def test_a_chat_replay_never_takes_a_completions_streams_form_nor_the_reverse(tmp_path):
    async with judged_replica(tmp_path, "ok") as (cp, _, cache, _):
        client = cp.client()
        chat_ask = {**HI_ASK, "messages": [{"role": "user", "content": "Name a river (x)."}]}
        # The completions stream teaches its form; a plain chat answer is stored.
        assert (await sse_chunks(cp, "/v1/completions", PROMPT_ASK))[0] == "miss"
        await cache.drain()
        await client.chat.completions.create(**chat_ask)
        await cache.drain()
        status, chunks = await sse_chunks(cp, "/v1/chat/completions", chat_ask)
        assert status == "hit-exact"
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert all("delta" in ch and "text" not in ch for c in chunks for ch in c["choices"])
        # The reverse: a chat stream's form never shapes a completions replay.
        other = {**HI_ASK, "messages": [{"role": "user", "content": "Another river?"}]}
        assert (await sse_chunks(cp, "/v1/chat/completions", other))[0] == "miss"
        await cache.drain()
        prompt = {**PROMPT_ASK, "prompt": "Lakes (y) are"}
        await client.completions.create(**prompt)
        await cache.drain()
        status, chunks = await sse_chunks(cp, "/v1/completions", prompt)
        assert status == "hit-exact"
        assert {c["object"] for c in chunks} == {"text_completion"}
        assert all("text" in ch and "delta" not in ch for c in chunks for ch in c["choices"])


def chat_request(tenant: str, question: str, endpoint: str = "chat"
                 ) -> cache_port.CacheRequest:
    body: dict[str, Any] = ({"model": "m", "temperature": 0,
                             "messages": [{"role": "user", "content": question}]}
                            if endpoint == "chat" else
                            {"model": "m", "temperature": 0, "prompt": question})
    return cache_port.CacheRequest(tenant, "m", endpoint, body)  # type: ignore[arg-type]


def stored(endpoint: str, text: str) -> dict[str, Any]:
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}}
                              if endpoint == "chat" else {"index": 0, "text": text})
    return {"id": "cmpl-7", "created": 7, "model": "m", "choices": [
        {**choice, "finish_reason": "stop", "logprobs": None}],
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def completions_form() -> dict[str, Any]:
    head = {"id": "", "object": "text_completion", "created": 0, "model": "m",
            "prompt_token_ids": None}
    blank = {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
    return {"content": {**head, "choices": [blank]}, "finish": {**head, "choices": [blank]}}


@pytest.mark.parametrize("with_object", [True, False], ids=["object", "no-object"])
async def test_forms_are_learnt_per_endpoint_kind(with_object: bool) -> None:
    """The form a completions stream taught is never handed to a chat hit (the cache's
    own key), whatever the replay would then make of it. A completions stream whose
    chunks carry no ``object`` folds to an answer without one: its form is still filed
    under the request's endpoint, the completions one."""
    cache = response_cache.TieredCache(
        options=response_cache.Options(semantic_enabled=False), l1=l1.MemoryL1(100, 10**6),
        metrics=metrics_mod.Metrics(CollectorRegistry()))
    try:
        answer = stored("completions", " long")
        if not with_object:
            answer.pop("object")
        taught = await cache.lookup(chat_request("a", "Rivers are", "completions"))
        cache.store(taught, stream_fold.Assembled(answer, completions_form()))
        plain = await cache.lookup(chat_request("a", "Name a river."))
        cache.store(plain, stored("chat", "Nile."))
        more = await cache.lookup(chat_request("a", "Lakes are", "completions"))
        cache.store(more, stored("completions", " deep"))
        await cache.drain()
        hit = await cache.lookup(chat_request("a", "Name a river."))
        assert hit.hit is not None and hit.hit.form is None
        same = await cache.lookup(chat_request("a", "Lakes are", "completions"))
        assert same.hit is not None and same.hit.form == completions_form()
    finally:
        await cache.close()


def chat_form() -> dict[str, Any]:
    head = {"id": "", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    blank = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}
    return {"role": {**head, "choices": [{**blank, "delta": {"role": "assistant"}}]},
            "content": {**head, "choices": [blank]}, "finish": {**head, "choices": [blank]}}


def test_a_form_of_the_other_kind_never_shapes_a_replay():
    for answer, form, kind, body in (
            (stored("chat", "Nile."), completions_form(), "chat.completion.chunk", "delta"),
            (stored("completions", " long"), chat_form(), "text_completion", "text")):
        chunks = [orjson.loads(e) for e in sse.SSEParser().feed(
            b"".join(stream_replay.replay(answer, form, include_usage=False)))
            if e != sse.DONE]
        assert {c["object"] for c in chunks} == {kind}
        assert all("prompt_token_ids" not in c for c in chunks)
        assert all(set(ch) & {"text", "delta"} == {body} for c in chunks for ch in c["choices"])


def test_the_default_form_carries_the_fingerprint_on_the_last_chunk_as_vllm_does():
    """vLLM 0.32 sends ``system_fingerprint`` on its last chunk only: the usage chunk when
    one was asked for, else the finish chunk."""
    for endpoint in ("chat", "completions"):
        answer = {**stored(endpoint, "Nile."), "system_fingerprint": "vllm-0.32.0-fp"}
        for usage in (False, True):
            chunks = [orjson.loads(e) for e in sse.SSEParser().feed(
                b"".join(stream_replay.replay(answer, include_usage=usage)))
                if e != sse.DONE]
            assert [c.get("system_fingerprint") for c in chunks] == \
                [None] * (len(chunks) - 1) + ["vllm-0.32.0-fp"]
            assert ("usage" in chunks[-1]) is usage


def test_renewed_keeps_the_prefix_and_the_recorded_form():
    form = completions_form()
    fresh = stream_replay.renewed(stream_fold.Assembled(stored("completions", "x"), form),
                                  1234, "abc")
    assert (fresh["id"], fresh["created"]) == ("cmpl-abc", 1234)
    assert getattr(fresh, "form", None) == form
    chat = stream_replay.renewed({**stored("chat", "x"), "id": "chatcmpl-9f3c"}, 5, "d")
    assert (chat["id"], chat["created"]) == ("chatcmpl-d", 5)
    bare = stream_replay.renewed({**stored("chat", "x"), "id": "opaque"}, 5, "d")
    assert bare["id"] == "chatcmpl-d"
