"""Chat-completion stream → Anthropic event stream: real vLLM streams in, parsed by the
anthropic client's own stream parser, compared with vLLM's own /v1/messages streams; and
the whole round trip (anthropic client → translation → a simulator serving only chat)."""

from __future__ import annotations

import json
import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from controlplane.core import anthropic_request, anthropic_response, anthropic_stream
from tests import harness
from tests.controlplane import anthropic_sdk as sdk
from tests.simulator.conftest import MODEL, Sim, start

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


def translate(raw: bytes, size: int = 7, input_tokens: int = 0) -> bytes:
    translator = anthropic_stream.StreamTranslator("smollm2", input_tokens=input_tokens)
    out = b"".join(translator.feed(piece) for piece in sdk.pieces(raw, size))
    assert translator.complete
    return out


def raw_events(stream: bytes) -> list[dict[str, Any]]:
    """Each event's data, ids and usage left out (they differ by design)."""
    out = []
    for block in stream.decode().strip().split("\n\n"):
        payload = json.loads(block.split("data: ", 1)[1])
        payload.pop("usage", None)
        payload.get("message", {}).pop("id", None)
        payload.get("message", {}).pop("usage", None)
        payload.get("content_block", {}).pop("id", None)
        out.append(payload)
    return [e for e in out if e["type"] != "ping"]


@pytest.mark.parametrize(("chat", "theirs"), [
    ("chat_stream_usage.sse", "messages_stream.sse"),        # max_tokens
    ("chat_stop_stream.sse", "messages_stop_stream.sse"),    # a stop sequence
    ("chat_natural_stream.sse", "messages_natural_stream.sse"),  # end_turn
    ("chat_tool_stream.sse", "messages_tool_stream.sse"),    # a tool call
])
def test_real_vllm_streams_translate_as_vllm_itself_translates(chat: str, theirs: str) -> None:
    ours = translate(sdk.data(chat))
    assert raw_events(ours) == raw_events(sdk.data(theirs))


@pytest.mark.parametrize("size", [1, 13, 4096])
def test_the_sdk_reads_the_translated_stream_as_vllms_own(size: int) -> None:
    ours = sdk.final_message(translate(sdk.data("chat_stop_stream.sse"), size))
    theirs = sdk.final_message(sdk.data("messages_stop_stream.sse"))
    assert ours.content == theirs.content and ours.usage == theirs.usage
    assert (ours.stop_reason, ours.stop_sequence) == ("stop_sequence", "o")
    assert ours.id == "msg_9f38e15ad0d1ceb7"


def test_message_start_then_ping_with_the_estimate_then_the_real_count() -> None:
    out = translate(sdk.data("chat_stream_usage.sse"), input_tokens=18)
    first, second = out.split(b"\n\n")[:2]
    assert first.startswith(b"event: message_start") and b'"input_tokens":18' in first
    assert second == b'event: ping\ndata: {"type":"ping"}'
    final = sdk.final_message(out)
    assert final.usage.input_tokens == 20 and final.usage.output_tokens == 8


def test_a_broken_stream_ends_with_an_error_event_the_sdk_raises() -> None:
    raw = sdk.data("chat_stream_usage.sse")
    translator = anthropic_stream.StreamTranslator("smollm2")
    out = translator.feed(raw[: len(raw) // 2]) + translator.interrupted("backend went away")
    assert not translator.complete and translator.feed(raw) == b""  # nothing after the end
    with pytest.raises(anthropic.APIStatusError) as err:
        sdk.final_message(out)
    assert err.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "backend went away"}}


def test_a_backend_error_object_mid_stream_becomes_an_error_event() -> None:
    translator = anthropic_stream.StreamTranslator("m")
    out = translator.feed(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
    assert out.startswith(b"event: error\n") and b"engine died" in out
    assert not translator.complete


def test_an_empty_answer_is_one_empty_text_block() -> None:
    chunk = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""},
                                              "finish_reason": "stop"}]}
    raw = b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
    final = sdk.final_message(translate(raw))
    assert [(b.type, b.text) for b in final.content] == [("text", "")]  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"


def test_reasoning_then_text_then_two_tool_calls_are_four_blocks() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "chatcmpl-2", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    raw = b"".join([
        chunk({"reasoning_content": "Think"}), chunk({"reasoning_content": "ing."}),
        chunk({"content": "Let me"}), chunk({"content": " check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), b"data: [DONE]\n\n"])
    final = sdk.final_message(translate(raw, size=5))
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Thinking."  # type: ignore[union-attr]
    assert final.content[1].text == "Let me check."  # type: ignore[union-attr]
    assert final.content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert (final.content[3].id, final.content[3].input) == ("call_b", {})  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"


def test_a_stored_message_replays_as_the_stream_that_makes_it() -> None:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
               "content": [{"type": "text", "text": "Checking."},
                           {"type": "tool_use", "id": "t1", "name": "get_weather",
                            "input": {"city": "Paris", "days": [1, 2]}}],
               "stop_reason": "tool_use", "stop_sequence": None,
               "usage": {"input_tokens": 9, "output_tokens": 4}}
    final = sdk.final_message(anthropic_stream.replay(message))
    assert final.model_dump(exclude_none=True) == sdk.parsed_message(message).model_dump(
        exclude_none=True)


# -- the whole round trip against a simulator that serves chat only ----------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    pool = harness.ProcessPool(pathlib.Path(tmp_path_factory.mktemp("anthropic")))
    try:
        yield start(pool, "--time-scale", "0", "--task", "generate", name="sim-chat-only")
    finally:
        pool.stop_all()


def via_chat(sim: Sim) -> sdk.Handler:
    """What the control plane will do for a backend without /v1/messages."""
    def handle(body: dict[str, Any]) -> httpx2.Response:
        chat = anthropic_request.to_chat(body)
        req = urllib.request.Request(sim.url + "/v1/chat/completions",
                                     data=orjson.dumps(chat),
                                     headers={"Content-Type": "application/json"})
        upstream = urllib.request.urlopen(req, timeout=30)
        if not chat.get("stream"):
            with upstream:
                return httpx2.Response(200, json=anthropic_response.from_chat(
                    orjson.loads(upstream.read())))

        def events() -> Iterator[bytes]:
            translator = anthropic_stream.StreamTranslator(body["model"])
            with upstream:
                while piece := upstream.read1(512):
                    yield translator.feed(piece)

        return sdk.sse_response(events())
    return handle


def test_messages_with_a_system_prompt_through_chat(sim: Sim) -> None:
    ask = {"model": MODEL, "max_tokens": 6, "system": "Be brief.",
           "messages": [{"role": "user", "content": "Hello"}]}
    with sdk.client(via_chat(sim)) as client:
        whole = client.messages.create(**ask)  # type: ignore[call-overload]
        with client.messages.stream(**ask) as stream:  # type: ignore[arg-type]
            texts = list(stream.text_stream)
            final = stream.get_final_message()
    assert whole.stop_reason == final.stop_reason == "max_tokens"
    assert whole.content[0].text == final.content[0].text == "".join(texts)  # type: ignore[union-attr]
    assert len(texts) == 6 and final.usage.output_tokens == 6
    # the second request found the prompt in the prefix cache: Anthropic counts it apart
    assert final.usage.cache_read_input_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0))


def test_a_tool_definition_through_chat_streaming_or_not(sim: Sim) -> None:
    ask = {"model": MODEL, "max_tokens": 50, "system": "Use the tools.", "tools": [WEATHER],
           "messages": [{"role": "user", "content": "Call get_weather for Paris."}]}
    with sdk.client(via_chat(sim)) as client:
        whole = client.messages.create(**ask)  # type: ignore[call-overload]
        with client.messages.stream(**ask) as stream:  # type: ignore[arg-type]
            final = stream.get_final_message()
    for message in (whole, final):
        assert message.stop_reason == "tool_use"
        block = message.content[0]
        assert block.type == "tool_use" and block.name == "get_weather"
        assert isinstance(block.input, dict) and set(block.input) == {"city"}
    assert whole.content[0].input == final.content[0].input  # type: ignore[union-attr]
