"""The whole API surface through a real control plane (a subprocess, so its memory can be
read) in front of real simulators, with the official clients: openai for Responses and
audio, anthropic for Messages, plain HTTP for rerank, score, tokenize and translations.

The fleet: two vLLM-mode simulators of the chat model (Responses store on, so a
continuation only works on the engine that stored it), one that serves chat completions
only (Messages must be translated for it), a reranker, a Whisper-like transcription
server and a speech server — all static upstreams whose tasks the config names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import urllib.request
import wave
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests import fleet, harness, uploads

pytestmark = pytest.mark.timeout(300)

MIB = 1024 * 1024
CHAT = "chat-model"
OLD = "old-model"           # served by a backend of chat completions only
RANKER = "ranker"
WHISPER = "whisper"
TTS = "tts"
ONE_AT_A_TIME_KEY = "sk-rel-one-at-a-time-3f5b7d9e1a2c4e68"   # max_concurrent: 1
TOOLS = [{"name": "get_weather", "description": "The weather in a city.",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]


class Surface:
    def __init__(self, base: str, cp: harness.ManagedProcess) -> None:
        self.base = base
        self.cp = cp

    def openai(self, key: str = fleet.TENANT_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0,
                             timeout=60)

    def anthropic(self, key: str = fleet.TENANT_KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base, api_key=key, max_retries=0,
                                   timeout=60)

    def post(self, path: str, body: dict[str, Any], key: str = fleet.TENANT_KEY,
             ) -> tuple[int, dict[str, str], Any]:
        status, headers, raw = harness.http(self.base + path, json.dumps(body).encode(), key,
                                            timeout=30)
        return status, headers, json.loads(raw)


def _sim(pool: harness.ProcessPool, name: str, model: str, *args: str) -> str:
    port = harness.free_port()
    pool.start(name, fleet.simulator_argv(port, model, *args, time_scale=0),
               ready_url=f"http://127.0.0.1:{port}/health")
    return f"http://127.0.0.1:{port}"


def _upstream(name: str, url: str, model: str, *tasks: str) -> dict[str, Any]:
    return {"name": name, "url": url, "models": [model], "tasks": list(tasks)}


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    work = tmp_path_factory.mktemp("surface")
    pool = harness.ProcessPool(work)
    try:
        llm = ("--task", "generate", "--task", "responses", "--task", "messages",
               "--task", "tokenize", "--responses-store")
        ups = [_upstream("llm-1", _sim(pool, "llm-1", CHAT, *llm), CHAT, "generate",
                         "responses", "messages", "tokenize"),
               _upstream("llm-2", _sim(pool, "llm-2", CHAT, *llm), CHAT, "generate",
                         "responses", "messages", "tokenize"),
               _upstream("old", _sim(pool, "old", OLD, "--task", "generate"), OLD,
                         "generate"),
               _upstream("ranker", _sim(pool, "ranker", RANKER, "--task", "rerank", "--task",
                                        "score", "--task", "tokenize"), RANKER, "rerank",
                         "score", "tokenize"),
               _upstream("whisper", _sim(pool, "whisper", WHISPER, "--task", "transcription",
                                         "--max-audio-mb", "64"), WHISPER, "transcription"),
               _upstream("tts", _sim(pool, "tts", TTS, "--engine", "speech"), TTS, "speech")]
        http = harness.free_port()
        cfg = fleet.controlplane_config(
            "cp", http, harness.free_port(), work / "cp-data", upstreams=ups,
            models=[{"name": m} for m in (CHAT, OLD, RANKER, WHISPER, TTS)],
            http={"max_audio_bytes": 25 * 1000 * 1000, "body_timeout_s": 30.0},
            cache={"semantic_enabled": False})
        cfg["auth"]["tenants"][1]["allowed_models"] = [OLD]
        cfg["auth"]["tenants"].append({"name": "one-at-a-time", "keys": [ONE_AT_A_TIME_KEY],
                                       "max_concurrent": 1})
        base = f"http://127.0.0.1:{http}"
        cp = pool.start("cp", ["synapse", "controlplane", "--config",
                               str(fleet.write_yaml(work / "cp.yaml", cfg))],
                        ready_url=base + "/health")
        harness.wait_until(lambda: fleet.backends_ready(base) == len(ups), 30,
                           "every upstream to be healthy", proc=cp)
        yield Surface(base, cp)
    finally:
        pool.stop_all()


# -- Responses ---------------------------------------------------------------------------


def test_responses_whole_and_streamed(surface: Surface) -> None:
    with surface.openai() as c:
        raw = c.responses.with_raw_response.create(model=CHAT, input="Say hello",
                                                   instructions="Be brief.",
                                                   max_output_tokens=16)
        reply = raw.parse()
        assert raw.headers["x-synapse-backend"] in ("static/llm-1", "static/llm-2")
        assert reply.status in ("completed", "incomplete") and reply.output_text
        with c.responses.stream(model=CHAT, input="Stream a short story",
                                max_output_tokens=16) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
    assert deltas and "".join(deltas) == final.output_text


def test_a_continuation_goes_to_the_engine_that_stored_the_answer(surface: Surface) -> None:
    with surface.openai() as c:
        first = c.responses.with_raw_response.create(model=CHAT, input="Remember: blue",
                                                     max_output_tokens=8)
        held_by = first.headers["x-synapse-backend"]
        previous = first.parse().id
        for turn in range(4):     # each engine keeps its own answers: never the other one
            nxt = c.responses.with_raw_response.create(
                model=CHAT, input=f"And now? {turn}", previous_response_id=previous,
                max_output_tokens=8)
            assert nxt.headers["x-synapse-backend"] == held_by
            previous = nxt.parse().id


def test_another_tenant_cannot_continue_a_stored_answer(surface: Surface) -> None:
    with surface.openai() as c:
        first = c.responses.create(model=CHAT, input="The code word is heliotrope",
                                   max_output_tokens=8)
    with surface.openai(ONE_AT_A_TIME_KEY) as thief:     # another tenant, every model
        with pytest.raises(openai.NotFoundError) as whole:
            thief.responses.create(model=CHAT, input="Repeat the code word.",
                                   previous_response_id=first.id)
        with pytest.raises(openai.NotFoundError) as streamed, thief.responses.stream(
                model=CHAT, input="Repeat the code word.",
                previous_response_id=first.id) as stream:
            list(stream)
    for refused in (whole.value, streamed.value):
        assert isinstance(refused.body, dict)
        assert refused.body["code"] == "previous_response_not_found"
    with surface.openai() as c:         # the owner still can, on whichever worker
        nxt = c.responses.create(model=CHAT, input="And the code word?",
                                 previous_response_id=first.id, max_output_tokens=8)
    assert nxt.previous_response_id == first.id


def test_stateless_responses_are_cached_stateful_ones_never(surface: Surface) -> None:
    ask: dict[str, Any] = {"model": CHAT, "input": "What is a GPU?", "temperature": 0,
                           "store": False, "max_output_tokens": 16}
    with surface.openai() as c:
        first = c.responses.with_raw_response.create(**ask)
        second = c.responses.with_raw_response.create(**ask)
        with c.responses.stream(**ask) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            replayed = stream.get_final_response()
        kept = c.responses.with_raw_response.create(**{**ask, "store": True})
        follow = c.responses.with_raw_response.create(
            **{**ask, "store": True, "previous_response_id": kept.parse().id})
    assert first.headers["x-synapse-cache"] == "miss"
    assert second.headers["x-synapse-cache"] == "hit-exact"
    one, two = first.parse(), second.parse()
    assert two.output_text == one.output_text == replayed.output_text == "".join(deltas)
    assert two.id != one.id and replayed.id not in (one.id, two.id)   # new ids per hit
    # asked to be kept (store), or continuing a stored conversation: never from the cache
    assert kept.headers["x-synapse-cache"] == follow.headers["x-synapse-cache"] == "bypass"
    assert follow.headers["x-synapse-backend"] == kept.headers["x-synapse-backend"]


# -- Messages ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CHAT, OLD], ids=["native", "translated"])
def test_messages_with_a_system_prompt_and_a_tool(surface: Surface, model: str) -> None:
    with surface.anthropic() as c:
        raw = c.messages.with_raw_response.create(
            model=model, max_tokens=32, system="You are a weather bot.", tools=TOOLS,
            messages=[{"role": "user", "content": "Call get_weather for Paris."}])
        message = raw.parse()
        assert raw.headers["request-id"] == raw.headers["x-request-id"]
        assert message.stop_reason == "tool_use"
        call = next(b for b in message.content if b.type == "tool_use")
        assert call.name == "get_weather" and isinstance(call.input["city"], str)
        text = c.messages.create(model=model, max_tokens=16, system="Answer in one line.",
                                 messages=[{"role": "user", "content": "Hello!"}])
        assert text.content[0].type == "text" and text.content[0].text
        assert text.usage.output_tokens > 0


@pytest.mark.parametrize("model", [CHAT, OLD], ids=["native", "translated"])
def test_messages_streamed(surface: Surface, model: str) -> None:
    with surface.anthropic() as c, c.messages.stream(
            model=model, max_tokens=24, system="Be terse.", tools=TOOLS,
            messages=[{"role": "user", "content": "Use get_weather for Rome."}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and "message_stop" in kinds
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.name == "get_weather" and "city" in call.input
    with surface.anthropic() as c, c.messages.stream(
            model=model, max_tokens=16,
            messages=[{"role": "user", "content": "Tell me a story"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]


@pytest.mark.parametrize("model", [CHAT, OLD], ids=["native", "translated"])
def test_messages_are_cached_in_a_scope_of_their_own(surface: Surface, model: str) -> None:
    # (anthropic 2.16 takes temperature only as an extra field)
    ask: dict[str, Any] = {"model": model, "max_tokens": 16, "extra_body": {"temperature": 0},
                           "messages": [{"role": "user", "content": f"What is a GPU? {model}"}]}
    with surface.anthropic() as c:
        first = c.messages.with_raw_response.create(**ask)
        second = c.messages.with_raw_response.create(**ask)
        with c.messages.stream(**ask) as stream:
            replayed = stream.get_final_message()
    assert first.headers["x-synapse-cache"] == "miss"
    assert second.headers["x-synapse-cache"] == "hit-exact"
    texts = [m.content[0].text for m in (first.parse(), second.parse(), replayed)]  # type: ignore[union-attr]
    assert texts[0] and texts == [texts[0]] * 3
    # the chat request it translates to has its own entry: no answer crosses over
    with surface.openai() as oc:
        chat = oc.chat.completions.with_raw_response.create(
            model=model, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": f"What is a GPU? {model}"}])
    assert chat.headers["x-synapse-cache"] == "miss"


def test_messages_errors_are_anthropic_shaped(surface: Surface) -> None:
    with surface.anthropic(fleet.ADMIN_KEY) as c, pytest.raises(
            anthropic.PermissionDeniedError) as denied:
        c.messages.create(model=CHAT, max_tokens=8,
                          messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with surface.anthropic(fleet.OTHER_KEY) as c, pytest.raises(anthropic.NotFoundError):
        c.messages.create(model=CHAT, max_tokens=8,         # not its model: unknown to it
                          messages=[{"role": "user", "content": "hi"}])
    with surface.anthropic("sk-wrong") as c, pytest.raises(anthropic.AuthenticationError):
        c.messages.create(model=CHAT, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    with surface.anthropic() as c, pytest.raises(anthropic.NotFoundError) as missing:
        c.messages.create(model="no-such-model", max_tokens=8,
                          messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["type"] == "error"  # type: ignore[index]


# -- audio -------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def test_speech_round_trip_through_transcription(surface: Surface,
                                                 tmp_path: pathlib.Path) -> None:
    path = tmp_path / "speech.wav"
    with surface.openai() as c:
        with c.audio.speech.with_streaming_response.create(
                model=TTS, voice="alloy", input="The quick brown fox", response_format="wav",
        ) as resp:
            assert resp.headers["content-type"] == "audio/wav"
            assert resp.headers["x-synapse-backend"] == "static/tts"
            resp.stream_to_file(path)
        with wave.open(str(path)) as w:
            assert w.getnframes() == 4 * 7_200 and w.getframerate() == 24_000
        with path.open("rb") as f:
            text = c.audio.transcriptions.create(model=WHISPER, file=f)
    data = path.read_bytes()
    assert text.text == f"Simulated transcription of {len(data)} bytes, blake2b {_digest(data)}."


async def test_translation_with_the_file_before_the_model(surface: Surface) -> None:
    data = b"RIFF-not-really-a-wav-but-bytes" * 1000
    form = aiohttp.FormData()
    form.add_field("file", data, filename="a.ogg", content_type="audio/ogg")
    form.add_fields(("model", WHISPER), ("response_format", "verbose_json"))
    async with aiohttp.ClientSession() as session, session.post(
            surface.base + "/v1/audio/translations", data=form,
            headers={"Authorization": f"Bearer {fleet.TENANT_KEY}"}) as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["text"] == f"Simulated translation of {len(data)} bytes, blake2b {_digest(data)}."


async def test_uploads_stream_through_and_30_mb_gets_413_without_being_held(
        surface: Surface) -> None:
    url = surface.base + "/v1/audio/transcriptions"
    pid = surface.cp.popen.pid
    before = uploads.proc_kib(pid, "VmHWM")
    status, body = await uploads.post_audio(url, WHISPER, 20 * MIB, fleet.TENANT_KEY)
    assert status == 200 and f"of {20 * MIB} bytes" in body["text"]
    # chunked: refused when it passes 25 MB
    status, body = await uploads.post_audio(url, WHISPER, 30 * MIB, fleet.TENANT_KEY)
    assert status == 413 and body["error"]["code"] == "upload_too_large"
    with surface.openai() as c, pytest.raises(openai.APIStatusError) as declared:
        c.audio.transcriptions.create(model=WHISPER, file=("big.wav", b"\0" * (30 * MIB)))
    assert declared.value.status_code == 413        # Content-Length: refused before reading
    # the control plane's peak memory grew by far less than the 20 MB it passed on
    assert uploads.proc_kib(pid, "VmHWM") - before < 10 * 1024


async def _start_upload(base: str, path: str, key: str, parts: list[tuple[str, bytes]],
                        length: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upload whose head and first ``parts`` (name, data; ``file`` is the file) are
    sent, announcing ``length`` bytes of body: the rest is never sent."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b""
    for name, data in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="a.wav"' if name == "file"
                                                     else "")
        body += (f"--{uploads.BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n"
                 .encode() + data + (b"" if name == "file" else b"\r\n"))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: multipart/form-data; boundary={uploads.BOUNDARY}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + body)
    await writer.drain()
    return reader, writer


async def _trickle(writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(0.05)
        writer.write(b"\1" * 4096)
        await writer.drain()


def _held(surface: Surface) -> bool:
    status, _, _ = harness.http(surface.base + "/tokenize",
                                json.dumps({"model": RANKER, "prompt": "x"}).encode(),
                                ONE_AT_A_TIME_KEY)
    return status == 429


async def _post_form(surface: Surface, key: str, *fields: tuple[str, bytes]) -> int:
    form = aiohttp.FormData()
    for name, data in fields:
        if name == "file":
            form.add_field(name, data, filename="a.wav", content_type="audio/wav")
        else:
            form.add_field(name, data.decode())
    async with aiohttp.ClientSession() as session, session.post(
            surface.base + "/v1/audio/transcriptions", data=form,
            headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def test_a_tenant_at_its_limit_is_refused_before_its_upload_is_read(
        surface: Surface) -> None:
    path = "/v1/audio/transcriptions"
    # the tenant's one slot: an upload whose file trickles in and never ends
    _, holder = await _start_upload(surface.base, path, ONE_AT_A_TIME_KEY,
                                    [("model", WHISPER.encode()), ("file", b"\1" * 1024)],
                                    8 * MIB)
    trickle = asyncio.create_task(_trickle(holder))
    try:
        await asyncio.to_thread(harness.wait_until, lambda: _held(surface), 30,
                                "the upload to hold the tenant's slot", proc=surface.cp)
        # the file before the model: once it would have been spooled to disk while the
        # server waited for the rest of it; now the answer comes before the file does
        reader, writer = await _start_upload(surface.base, path, ONE_AT_A_TIME_KEY,
                                             [("file", b"\2" * (64 * 1024))], 8 * MIB)
        try:
            status_line = await asyncio.wait_for(reader.readline(), 10)
        except TimeoutError:
            raise AssertionError("no answer while the file was still arriving: the "
                                 "control plane was reading (spooling) it") from None
        finally:
            writer.close()
        assert status_line.split()[1] == b"429", status_line
    finally:
        trickle.cancel()
        holder.close()
    # every way out gives the slot back: the broken-off upload, a form without a model
    await _accepted_soon(surface)
    assert await _post_form(surface, ONE_AT_A_TIME_KEY, ("file", b"abc")) == 400
    await _accepted_soon(surface)


async def _accepted_soon(surface: Surface) -> None:
    """A good upload of the one-at-a-time tenant is answered 200 within a few seconds
    (a slot is given back just after its answer, so one 429 may come first)."""
    good = (("file", b"abc"), ("model", WHISPER.encode()))
    deadline = asyncio.get_running_loop().time() + 30
    while (status := await _post_form(surface, ONE_AT_A_TIME_KEY, *good)) == 429:
        assert asyncio.get_running_loop().time() < deadline, "the slot was never given back"
        await asyncio.sleep(0.1)
    assert status == 200


# -- rerank, score, tokenize -------------------------------------------------------------


def test_rerank_score_tokenize_by_http(surface: Surface) -> None:
    status, headers, ranked = surface.post("/v1/rerank", {
        "model": RANKER, "query": "capital of France",
        "documents": ["Berlin is in Germany", "Paris is the capital of France"], "top_n": 1})
    assert status == 200 and headers["x-synapse-backend"] == "static/ranker"
    assert [r["index"] for r in ranked["results"]] == [1]
    status, _, scored = surface.post("/v1/score", {"model": RANKER, "text_1": "a cat",
                                                   "text_2": ["a cat", "a dog"]})
    assert status == 200 and scored["data"][0]["score"] > scored["data"][1]["score"]
    # (one backend: a simulator decodes only ids it has produced itself)
    status, _, tokens = surface.post("/tokenize", {"model": RANKER, "prompt": "Hello world"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) > 0
    status, _, text = surface.post("/detokenize", {"model": RANKER, "tokens": tokens["tokens"]})
    assert status == 200 and "Hello" in text["prompt"]
    # a path goes only to backends of its task: the chat model has no reranker
    status, _, refused = surface.post("/v1/rerank", {"model": CHAT, "query": "q",
                                                     "documents": ["d"]})
    assert status == 503 and "error" in refused


# -- the rules every path shares ---------------------------------------------------------

EVERY_PATH: list[tuple[str, dict[str, Any]]] = [
    ("/v1/responses", {"model": CHAT, "input": "hi"}),
    ("/v1/messages", {"model": CHAT, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/rerank", {"model": RANKER, "query": "q", "documents": ["d"]}),
    ("/v1/score", {"model": RANKER, "text_1": "a", "text_2": "b"}),
    ("/tokenize", {"model": CHAT, "prompt": "hi"}),
    ("/detokenize", {"model": CHAT, "tokens": [1, 2]}),
    ("/v1/audio/speech", {"model": TTS, "input": "hi", "voice": "alloy"}),
]


def _as_unknown(body: dict[str, Any], model: str) -> dict[str, Any]:
    """``body`` naming a model nobody has instead of ``model``."""
    return {**body, "model": "no-such-model"} if body.get("model") == model else body


def _comparable(refusal: dict[str, Any], model: str) -> str:
    """A refusal with the model's name and its request id (Anthropic's envelope) out."""
    return json.dumps({k: v for k, v in refusal.items() if k != "request_id"}).replace(
        model, "no-such-model")


@pytest.mark.parametrize(("path", "body"), EVERY_PATH, ids=[p for p, _ in EVERY_PATH])
def test_a_model_the_tenant_may_not_use_is_answered_as_an_unknown_one(
        surface: Surface, path: str, body: dict[str, Any]) -> None:
    """The same 404 as for a model that does not exist (the name aside): a different
    answer would tell the tenant which models other tenants have."""
    status, _, refused = surface.post(path, body, key=fleet.OTHER_KEY)
    unknown_status, _, unknown = surface.post(path, _as_unknown(body, body["model"]),
                                              key=fleet.OTHER_KEY)
    assert status == unknown_status == 404
    assert _comparable(refused, body["model"]) == _comparable(unknown, "no-such-model")


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
async def test_a_model_the_tenant_may_not_use_is_unknown_to_it_on_uploads(
        surface: Surface, path: str) -> None:
    async def refusal(model: str) -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData({"model": model})
        form.add_field("file", b"abc", filename="a.wav", content_type="audio/wav")
        async with aiohttp.ClientSession() as session, session.post(
                surface.base + path, data=form,
                headers={"Authorization": f"Bearer {fleet.OTHER_KEY}"}) as resp:
            return resp.status, await resp.json()
    status, body = await refusal(WHISPER)
    unknown_status, unknown = await refusal("no-such-model")
    assert status == unknown_status == 404
    assert _comparable(body, WHISPER) == _comparable(unknown, "no-such-model")


def test_an_unknown_path_gets_the_openai_404_envelope(surface: Surface) -> None:
    status, _, body = surface.post("/v1/nothing/here", {"model": CHAT})
    assert status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "unknown_route"


def test_openapi_describes_every_path(surface: Surface) -> None:
    with urllib.request.urlopen(surface.base + "/openapi.json", timeout=10) as resp:
        spec = json.loads(resp.read())
    for path in ("/v1/responses", "/v1/messages", "/v1/audio/transcriptions",
                 "/v1/audio/translations", "/v1/audio/speech", "/v1/rerank", "/v1/score",
                 "/tokenize", "/detokenize"):
        assert "post" in spec["paths"][path], path
    upload = spec["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload


def test_metrics_count_requests_by_route(surface: Surface) -> None:
    with surface.openai() as c:
        c.responses.create(model=CHAT, input="count me", max_output_tokens=4)
    surface.post("/tokenize", {"model": RANKER, "prompt": "count me"})
    req = urllib.request.Request(surface.base + "/metrics",
                                 headers={"Authorization": f"Bearer {fleet.ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    for route in ("/v1/responses", "/tokenize"):
        assert any(line.startswith("synapse_requests_total{") and f'route="{route}"' in line
                   and 'status="200"' in line for line in text.splitlines()), route


@pytest.mark.parametrize("field", [
    ("vllm_xargs", '{"kv_transfer_params": {"remote_host": "10.0.0.1"}}'),
    ("kv_transfer_params", '{"remote_host": "10.0.0.1"}'),
    ("ec_transfer_params", "{}")])
async def test_an_upload_form_cannot_carry_cache_transfer_parameters(
        surface: Surface, field: tuple[str, str]) -> None:
    """vLLM's audio endpoints read their form into a request with ``vllm_xargs``, whence
    its KV connector reads ``kv_transfer_params``: refused there as in a JSON body, before
    or after the file (review 83)."""
    name, value = field
    for after in (False, True):
        form = aiohttp.FormData({"model": WHISPER})
        if not after:
            form.add_field(name, value)
        form.add_field("file", b"abc", filename="a.wav", content_type="audio/wav")
        if after:
            form.add_field(name, value)
        async with aiohttp.ClientSession() as session, session.post(
                surface.base + "/v1/audio/transcriptions", data=form,
                headers={"Authorization": f"Bearer {fleet.TENANT_KEY}"}) as resp:
            body = await resp.json()
            assert resp.status == 400, body
            assert name in body["error"]["message"], body
