"""SSE helpers: parsing split chunks, assembling a response, replaying it."""

from __future__ import annotations

import orjson

from controlplane.core import sse
from tests.controlplane import cp_testing as t


def stream_bytes(chat: bool = True) -> bytes:
    chunks = t._chunks("m", "hello there world", chat)
    body = b"".join(sse.event(c) for c in chunks)
    body += sse.event({"id": "x", "object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 3,
                                 "total_tokens": 4}})
    return body + sse.event(sse.DONE)


def test_parser_handles_events_split_anywhere() -> None:
    raw = stream_bytes().replace(b"\n\n", b"\r\n\r\n")
    for size in (1, 7, 64, len(raw)):
        parser = sse.SSEParser()
        events = [e for i in range(0, len(raw), size) for e in parser.feed(raw[i:i + size])]
        assert events[-1] == sse.DONE and len(events) == 7


def test_assembled_stream_is_a_complete_response() -> None:
    parser = sse.SSEParser()
    asm = sse.assemble(parser.feed(stream_bytes()))
    assert asm.complete
    resp = asm.response()
    assert resp["object"] == "chat.completion"
    assert resp["choices"][0]["message"] == {"role": "assistant",
                                             "content": "hello there world"}
    assert resp["usage"]["total_tokens"] == 4
    cut = sse.assemble(sse.SSEParser().feed(stream_bytes()[:-len(sse.event(sse.DONE))]))
    assert not cut.complete


def test_tool_calls_and_completions_assemble() -> None:
    asm = sse.StreamAssembler()
    for piece in ('{"na', 'me_arg": 1}'):
        asm.add_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": piece}}]}}]})
    asm.add_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    asm.add_data(sse.DONE)
    call = asm.response()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"name_arg": 1}'
    comp = sse.assemble(sse.SSEParser().feed(stream_bytes(chat=False)))
    assert comp.response()["choices"][0]["text"] == "hello there world"


def test_replay_round_trips_through_the_assembler() -> None:
    stored = sse.assemble(sse.SSEParser().feed(stream_bytes())).response()
    replayed = b"".join(sse.replay(stored))
    assert replayed.endswith(b"data: [DONE]\n\n")
    again = sse.assemble(sse.SSEParser().feed(replayed))
    assert again.complete and again.response()["choices"] == stored["choices"]
    assert again.response()["usage"] == stored["usage"]
    err = orjson.loads(sse.error_event("cut")[6:])
    assert err["error"]["message"] == "cut"
