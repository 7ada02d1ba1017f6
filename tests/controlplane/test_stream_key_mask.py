"""An upstream's ``api_key`` never reaches a client inside a streamed 200 either: a hosted
provider that quotes the key it was sent in an error event of its stream (or anywhere in
its content) has it masked as ``[its api_key]``, raw, JSON-escaped or in base64, wherever
the reads of the stream split it; what the response cache stores of such a stream is
masked too, so a hit never replays the key. A keyless upstream's stream is passed on
exactly as it came, read for read.

The stream through the dispatcher's attempt (every split of the reads, from a scripted
transport), then through a running control plane on each streaming API (chat
completions, Responses, Anthropic Messages passed through and translated from chat),
from a stand-in engine that writes the key across two writes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from controlplane import errors, metrics
from controlplane.core import (
    cache_port,
    catalog,
    dispatch,
    ledger,
    prefix_index,
    registry,
    router,
    types,
)
from controlplane.core.mock_transport import MockResponse, MockTransport
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t

KEY = "sk-or-v1/3f9a0c1d7be24e5a+9c0f1d2e3b4a5c6d"
MASK = errors.KEY_MASK.decode()
CHAT = "/v1/chat/completions"
SSE = "text/event-stream"
# How a provider quotes the key: as is, JSON-escaped (its "/" as "\/"), in base64, and in
# an HTTP Basic credential (base64 of "user:key").
ESCAPED = json.dumps(KEY).strip('"').replace("/", "\\/")
B64 = base64.b64encode(KEY.encode()).decode()
BASIC = base64.b64encode(b"user:" + KEY.encode()).decode()
# Pieces of each spelling that must never reach a client.
PIECES = [s.encode() for s in (KEY[4:-4], ESCAPED[4:-4], B64[4:-4], BASIC[12:-8])]


def chat_event(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def delta(text: str, finish: str | None = None) -> bytes:
    return chat_event({"id": "c", "object": "chat.completion.chunk", "created": 1,
                       "model": t.MODEL, "choices": [{"index": 0, "delta": {"content": text},
                                                      "finish_reason": finish}]})


# A chat stream that quotes the key in its content and in an error event, in every
# spelling: the bytes a provider sends.
ROLE = chat_event({"id": "c", "object": "chat.completion.chunk", "created": 1,
                   "model": t.MODEL, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                  "finish_reason": None}]})
QUOTING = (ROLE + delta(f"your key is {KEY}.") + delta(f" base64 {B64}")
           + b'data: {"error": {"message": "invalid key \\"' + ESCAPED.encode()
           + b'\\" (Authorization: Basic ' + BASIC.encode() + b')"}}\n\n'
           + delta("", "stop") + b"data: [DONE]\n\n")
SHOWN = (ROLE + delta(f"your key is {MASK}.") + delta(f" base64 {MASK}")
         + b'data: {"error": {"message": "invalid key \\"' + MASK.encode()
         + b'\\" (Authorization: Basic '
         + errors.masked(BASIC.encode(), KEY) + b')"}}\n\n'
         + delta("", "stop") + b"data: [DONE]\n\n")


def dispatcher(api_key: str | None, shares_cache: bool = False, source: types.Source = "static",
               ) -> tuple[dispatch.Dispatcher, MockTransport]:
    """A dispatcher of one backend (a static upstream with ``api_key``, unless ``source``
    says an agent's engine) behind a scripted transport."""
    clock = ManualClock()
    reg = registry.Registry(clock, 15.0)
    reg.register(types.NodeInfo("n1"))
    reg.report("n1", [types.BackendState(key="n1/a", node="n1", name="a",
                                         url="http://a.internal:8000", models=(t.MODEL,),
                                         api_key=api_key, shares_cache=shares_cache,
                                         source=source)])
    rtr = router.Router(router.Params(policy="round_robin"), reg, ledger.Ledger(clock),
                        prefix_index.PrefixIndex(1000))
    mock = MockTransport(lambda req: MockResponse())
    d = dispatch.Dispatcher(mock, rtr, catalog.Catalog([catalog.ModelEntry(t.MODEL, (), ())]),
                            reg, metrics.Metrics(CollectorRegistry()), dispatch.Policy(1, 5.0, 7.0))
    return d, mock


async def relayed(d: dispatch.Dispatcher, mock: MockTransport,
                  reads: Sequence[bytes | BaseException]) -> list[bytes]:
    """The pieces the caller is handed for a stream the backend sent in ``reads``."""
    mock.handler = lambda req: MockResponse(200, list(reads), SSE)
    prompt = router.Prompt.from_text("hello there", 0)
    out = []
    async with d.exchange(d.plan(t.MODEL, prompt).route, prompt, CHAT, b"{}", "r") as attempt:
        while (piece := await attempt.next_chunk()) is not None:
            out.append(piece)
    return out


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` in two reads cut at every offset, and in reads of one byte each."""
    return [[data[:at], data[at:]] for at in range(1, len(data))] + [
        [data[i:i + 1] for i in range(len(data))]]


async def test_a_keyed_backends_stream_is_masked_wherever_its_reads_split_the_key() -> None:
    d, mock = dispatcher(KEY)
    for reads in splits(QUOTING):
        seen = b"".join(await relayed(d, mock, reads))
        assert seen == SHOWN, (reads[0][-30:], seen)
        assert not any(piece in seen for piece in PIECES)
        assert seen.count(errors.KEY_MASK) == 4


async def test_a_keyed_backend_whose_cache_tenants_share_has_both_its_key_and_counts_hidden(
        ) -> None:
    """The two changes a stream may need, one after the other, at every third split."""
    d, mock = dispatcher(KEY, shares_cache=True)
    usage = {"prompt_tokens": 300, "completion_tokens": 1, "total_tokens": 301,
             "prompt_tokens_details": {"cached_tokens": 272}}
    sent = (ROLE + delta(f"key {KEY}") + chat_event({"id": "c", "choices": [], "usage": usage})
            + b"data: [DONE]\n\n")
    for reads in splits(sent)[::3]:
        seen = b"".join(await relayed(d, mock, reads))
        assert seen.count(errors.KEY_MASK) == 1 and KEY[4:-4].encode() not in seen, seen
        assert b'"cached_tokens":0' in seen and b"272" not in seen, seen


async def test_a_keyed_stream_written_an_event_a_read_is_passed_on_read_for_read() -> None:
    """Nothing is held back past an event's end: each event reaches the caller as soon
    as it arrived, not with the next read."""
    d, mock = dispatcher(KEY)
    events = [ROLE, delta(f"key {KEY}"), delta("more"), delta("", "stop"), b"data: [DONE]\n\n"]
    assert await relayed(d, mock, events) == [ROLE, delta(f"key {MASK}"), delta("more"),
                                              delta("", "stop"), b"data: [DONE]\n\n"]


async def test_a_keyless_backends_stream_is_passed_on_exactly_as_it_came() -> None:
    """Nor is an agent's engine's read, though it has a key (the engine key: the engine
    its agent started never quotes it), so the common case pays nothing."""
    for d, mock in (dispatcher(None), dispatcher(KEY, source="agent")):
        for reads in splits(QUOTING)[::7]:
            assert await relayed(d, mock, reads) == [r for r in reads if r]


async def test_a_placeholder_keys_answers_keep_the_word_it_spells() -> None:
    """A key shorter than ``attempt.ANSWER_MASK_FROM`` (vLLM's conventional ``EMPTY``, or
    ``data``, which every event line starts with) is no secret: the answers of such a
    backend reach the client as the model wrote them; its refusals are still masked."""
    stream = ROLE + delta("EMPTY data, as asked") + delta("", "stop") + b"data: [DONE]\n\n"
    for key in ("EMPTY", "data"):
        d, mock = dispatcher(key)
        for reads in splits(stream)[::5]:
            assert b"".join(await relayed(d, mock, reads)) == stream
        mock.handler = lambda req: MockResponse(200, [b'{"content": "EMPTY data"}'])
        prompt = router.Prompt.from_text("hello there", 0)
        async with d.exchange(d.plan(t.MODEL, prompt).route, prompt, CHAT, b"{}",
                              "r") as attempt:
            assert await attempt.read() == b'{"content": "EMPTY data"}'


async def test_a_keyed_stream_that_breaks_inside_the_key_shows_no_piece_of_it() -> None:
    d, mock = dispatcher(KEY)
    start = ROLE + b'data: {"error": {"message": "bad key ' + KEY[:30].encode()
    seen: list[bytes] = []
    mock.handler = lambda req: MockResponse(
        200, [start, errors.UpstreamReadError("connection reset")], SSE)
    prompt = router.Prompt.from_text("hello there", 0)
    async with d.exchange(d.plan(t.MODEL, prompt).route, prompt, CHAT, b"{}", "r") as attempt:
        try:
            while (piece := await attempt.next_chunk()) is not None:
                seen.append(piece)
        except errors.UpstreamReadError:
            pass
        else:
            raise AssertionError("the broken stream ended as if complete")
    shown = b"".join(seen)
    assert shown.startswith(ROLE) and KEY[:8].encode() not in shown, shown


async def test_a_keyed_backends_whole_answer_is_masked() -> None:
    d, mock = dispatcher(KEY)
    mock.handler = lambda req: MockResponse(200, [b'{"choices": [{"message": {"content": "'
                                                  + ESCAPED.encode() + b'"}}]}'])
    prompt = router.Prompt.from_text("hello there", 0)
    async with d.exchange(d.plan(t.MODEL, prompt).route, prompt, CHAT, b"{}", "r") as attempt:
        assert await attempt.read() == (b'{"choices": [{"message": {"content": "'
                                        + errors.KEY_MASK + b'"}}]}')


# -- through a running control plane ------------------------------------------------------


HOLE = "@quote@"     # where the engine writes the spelling, as it is (valid in a JSON string)


def sse_events(*objs: dict[str, Any], named: bool = True) -> bytes:
    return b"".join((f"event: {o['type']}\n" if named else "").encode()
                    + b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


def responses_events(spelling: str) -> bytes:
    resp = {"id": "resp_1", "object": "response", "model": t.MODEL, "output": []}
    return sse_events(
        {"type": "response.created", "sequence_number": 0, "response": resp},
        {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m",
         "output_index": 0, "content_index": 0, "delta": HOLE},
        {"type": "error", "sequence_number": 2, "code": "invalid_api_key",
         "message": f"bad key {HOLE}", "param": None},
        {"type": "response.completed", "sequence_number": 3,
         "response": {**resp, "status": "completed"}}).replace(HOLE.encode(), spelling.encode())


def messages_events(spelling: str) -> bytes:
    return sse_events(
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": t.MODEL,
            "content": [], "stop_reason": None,
            "usage": {"input_tokens": 1, "output_tokens": 0}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                      "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                              "text": HOLE}},
        {"type": "error", "error": {"type": "authentication_error",
                                    "message": f"bad key {HOLE}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"}).replace(HOLE.encode(), spelling.encode())


def chat_stream(spelling: str, error: bool = True) -> bytes:
    """An error event in the middle (a complete answer without one: it is cached)."""
    quoted = sse_events({"error": {"message": f"bad key {HOLE}"}}, named=False) if error else b""
    return (ROLE + delta(HOLE) + quoted + delta("", "stop") + b"data: [DONE]\n\n").replace(
        HOLE.encode(), spelling.encode())


class QuotingEngine:
    """Streams, on every API, an answer that quotes ``KEY`` (as ``spelling``) in its
    content and in an error event, written in two writes that cut the key in half."""

    def __init__(self, spelling: str, error: bool = True) -> None:
        self.spelling = spelling
        self.error = error

    async def _write(self, request: web.Request, data: bytes) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        at = data.index(self.spelling.encode()) + len(self.spelling) // 2
        for piece in (data[:at], data[at:]):
            await resp.write(piece)
            await asyncio.sleep(0.02)   # two reads on the control plane's side
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._write(request, chat_stream(self.spelling, self.error))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._write(request, responses_events(self.spelling))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._write(request, messages_events(self.spelling))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/health", self.health)
        async with t.served(app) as url:
            yield url


class RememberingCache:
    """A response cache that stores every complete answer and answers a repeat of its
    request from it: what a stream's cache write kept, and what a hit replays."""

    def __init__(self) -> None:
        self.stored: dict[str, Mapping[str, Any]] = {}

    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        key = json.dumps(request.body.get("messages"))
        if (response := self.stored.get(key)) is not None:
            return cache_port.CacheDecision("hit-exact", cache_port.CacheHit("exact", response))
        return cache_port.CacheDecision("miss", may_store=True, token=key)

    def store(self, decision: cache_port.CacheDecision, response: Mapping[str, Any]) -> None:
        self.stored[decision.token] = response

    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        return (0, 0)

    async def close(self) -> None:
        return None


async def _post(cp: t.RunningCP, path: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as http, http.post(
            cp.url + path, json=body, headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
        assert r.status == 200, await r.text()
        return await r.read()


CALLS = {
    "/v1/chat/completions": {"model": t.MODEL, "stream": True, "temperature": 0,
                             "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses": {"model": t.MODEL, "stream": True, "input": "hi"},
    "/v1/messages": {"model": t.MODEL, "stream": True, "max_tokens": 8,
                     "messages": [{"role": "user", "content": "hi"}]},
}


async def test_no_streaming_api_shows_a_tenant_the_upstreams_key_in_any_spelling() -> None:
    for spelling in (KEY, ESCAPED, B64, BASIC):
        engine = QuotingEngine(spelling)
        async with engine.running() as url:
            s = t.settings(upstreams=[
                {"name": "hosted", "url": url, "models": [t.MODEL], "api_key": KEY,
                 "tasks": ["generate", "responses", "messages"]},
                {"name": "chat-only", "url": url, "models": ["other"], "api_key": KEY}],
                models=[{"name": t.MODEL}, {"name": "other"}])
            async with t.running(s) as cp:
                seen = {path: await _post(cp, path, body) for path, body in CALLS.items()}
                seen["translated"] = await _post(cp, "/v1/messages",
                                                 {**CALLS["/v1/messages"], "model": "other"})
        for path, body in seen.items():
            assert not any(piece in body for piece in PIECES), (spelling, path, body)
            assert errors.KEY_MASK in body, (spelling, path, body)


async def test_a_cached_stream_of_a_keyed_upstream_is_stored_and_replayed_masked() -> None:
    engine = QuotingEngine(KEY, error=False)
    cache = RememberingCache()
    async with engine.running() as url:
        s = t.settings(upstreams=[{"name": "hosted", "url": url, "models": [t.MODEL],
                                   "api_key": KEY}])
        async with t.running(s, cache=cache) as cp:
            first = await _post(cp, CHAT, CALLS[CHAT])
            for _ in range(200):
                if cache.stored:
                    break
                await asyncio.sleep(0.01)
            replayed = await _post(cp, CHAT, CALLS[CHAT])
    stored = json.dumps(list(cache.stored.values())).encode()
    assert cache.stored and KEY.encode() not in stored and MASK.encode() in stored, stored
    for body in (first, replayed):
        assert KEY[4:-4].encode() not in body and errors.KEY_MASK in body, body
    assert replayed != first, "the second answer came from the cache"


async def test_a_keyless_upstreams_stream_reaches_the_client_byte_for_byte() -> None:
    engine = QuotingEngine(KEY)
    async with engine.running() as url:
        s = t.settings(upstreams=[{"name": "vllm", "url": url, "models": [t.MODEL],
                                   "tasks": ["generate", "responses", "messages"]}])
        async with t.running(s) as cp:
            chat = await _post(cp, CHAT, CALLS[CHAT])
            messages = await _post(cp, "/v1/messages", CALLS["/v1/messages"])
    assert chat == chat_stream(KEY)
    assert messages == messages_events(KEY)
