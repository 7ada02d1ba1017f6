"""OpenAI chat-completion stream → Anthropic Messages event stream (pure), and a whole
Message replayed as a stream.

:class:`StreamTranslator` is fed the backend's SSE bytes as they arrive
(:meth:`~StreamTranslator.feed`, which parses them with ``sse.SSEParser``) and returns the
Anthropic events to send, so the answer streams through with no added wait:

* the first chunk opens the message: ``message_start`` (``usage.input_tokens`` is the
  caller's estimate — the backend reports the real count only at the end, in the
  ``message_delta`` that clients read last) and one ``ping``, as Anthropic sends;
* reasoning text, text and each tool call become blocks, one open at a time:
  ``content_block_start``, deltas (``thinking_delta``, ``text_delta``,
  ``input_json_delta`` with the argument fragments as they come), ``content_block_stop``
  when the next kind of content starts. Backends stream tool calls one after another; a
  fragment for an earlier call (interleaved parallel calls) goes to that call's block
  index even though the block was closed, which the SDK accumulates correctly;
* ``data: [DONE]`` closes the message: the open block is stopped (an answer with no
  content gets one empty text block), ``message_delta`` carries ``stop_reason`` /
  ``stop_sequence`` (``anthropic_response.stop_reason``) and the usage of the backend's
  usage chunk (the request asked for it: ``anthropic_request`` sets
  ``stream_options.include_usage``), then ``message_stop``.

A backend's mid-stream error object, or the caller's :meth:`~StreamTranslator.interrupted`
when the backend breaks off, ends the stream with an ``error`` event
(``anthropic_errors``) carrying the request's id, as the native stream's does. :attr:`~StreamTranslator.complete` says whether the backend
finished properly (finish reason and ``[DONE]`` seen) — only such answers may be cached.

:func:`replay` renders a stored Message in the same event sequence, one delta per block,
for a cache hit on a streaming request.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from controlplane import errors
from controlplane.core import anthropic_errors, anthropic_response, sse

DONE = "[DONE]"
EMPTY: dict[str, dict[str, str]] = {
    "text": {"type": "text", "text": ""},
    "thinking": {"type": "thinking", "thinking": "", "signature": ""},
}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def event(name: str, payload: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _start(message_id: str, model: str, input_tokens: int) -> bytes:
    message: dict[str, Any] = {"id": message_id, "type": "message", "role": "assistant", "content": [],
               "model": model, "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": input_tokens, "output_tokens": 0}}
    return (event("message_start", {"type": "message_start", "message": message})
            + event("ping", {"type": "ping"}))


def _block_start(index: int, block: Mapping[str, Any]) -> bytes:
    return event("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": block})


def _delta(index: int, delta: Mapping[str, Any]) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": index,
                                         "delta": delta})


def _block_stop(index: int) -> bytes:
    return event("content_block_stop", {"type": "content_block_stop", "index": index})


def _finish(reason: str, sequence: str | None, usage: Mapping[str, Any]) -> bytes:
    return (event("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                    "usage": usage})
            + event("message_stop", {"type": "message_stop"}))


class StreamTranslator:
    def __init__(self, model: str, input_tokens: int = 0,
                 message_id: str | None = None, request_id: str | None = None) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.message_id = message_id
        self.request_id = request_id    # carried by the error event, as in every error
        self.started = False
        self.ended = False
        self.done = False
        self.finish_reason: Any = None
        self._matched: Any = None
        self._usage: Any = None
        self._open: int | None = None  # index of the open block
        self._kind: str | None = None  # its kind: text, thinking or tool_use
        self._blocks = 0
        self._tools: dict[int, int] = {}  # the backend's tool-call index -> block index
        self._parser = sse.SSEParser()

    @property
    def complete(self) -> bool:
        """The backend finished properly: a finish reason, then ``[DONE]``, no error."""
        return self.done and self.finish_reason is not None

    def feed(self, data: bytes) -> bytes:
        """Anthropic events for the next piece of the backend's SSE stream."""
        out: list[bytes] = []
        for payload in self._parser.feed(data):
            if self.ended:
                break
            if payload == DONE:
                self.done = True
                out.append(self.end())
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                out.append(self.interrupted("the backend sent an event that is not JSON"))
                continue
            if isinstance(chunk, Mapping):
                out.append(self.chunk(chunk))
        return b"".join(out)

    def chunk(self, chunk: Mapping[str, Any]) -> bytes:
        """Anthropic events for one parsed chat-completion chunk."""
        if self.ended:
            return b""
        if isinstance(chunk.get("error"), Mapping):
            message = str(chunk["error"].get("message") or "the backend failed mid-stream")
            return self.interrupted(message)
        out = [self._begin(chunk)]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            out.append(self._choice(choices[0]))
        return b"".join(out)

    def end(self) -> bytes:
        """The events that close the message (on ``[DONE]``)."""
        if self.ended:
            return b""
        out = [self._begin({})]
        if self._blocks == 0:
            out.append(self._switch("text", EMPTY["text"])[0])
        out.append(self._close())
        reason, sequence = anthropic_response.stop_reason(self.finish_reason, self._matched,
                                                          bool(self._tools))
        usage = anthropic_response.usage(self._usage) if self._usage else {"output_tokens": 0}
        out.append(_finish(reason, sequence, usage))
        self.ended = True
        return b"".join(out)

    def interrupted(self, message: str) -> bytes:
        """The ``error`` event that ends a stream the backend broke off."""
        if self.ended:
            return b""
        self.ended = True
        return anthropic_errors.sse_event(
            errors.UpstreamError(message, code="stream_interrupted"), self.request_id)

    def _begin(self, chunk: Mapping[str, Any]) -> bytes:
        if self.started:
            return b""
        self.started = True
        if self.message_id is None:
            self.message_id = anthropic_response.message_id(chunk.get("id"))
        return _start(self.message_id, self.model, self.input_tokens)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open, self._kind = self._open, None, None
        return _block_stop(index)

    def _switch(self, kind: str, block: Mapping[str, Any]) -> tuple[bytes, int]:
        """Close the open block and open a new one of ``kind``: (events, its index)."""
        out = self._close()
        index = self._blocks
        self._open, self._kind = index, kind
        self._blocks += 1
        return out + _block_start(index, block), index

    def _text(self, kind: str, text: str) -> bytes:
        """A text or thinking delta, in the open block of that kind or a new one."""
        out, index = b"", self._open
        if self._kind != kind or index is None:
            out, index = self._switch(kind, EMPTY[kind])
        return out + _delta(index, {"type": f"{kind}_delta", kind: text})

    def _choice(self, choice: Mapping[str, Any]) -> bytes:
        out: list[bytes] = []
        delta = _mapping(choice.get("delta"))
        thinking = anthropic_response.reasoning_of(delta)
        if thinking:
            out.append(self._text("thinking", thinking))
        if isinstance(delta.get("content"), str) and delta["content"]:
            out.append(self._text("text", delta["content"]))
        for call in delta.get("tool_calls") or ():
            if isinstance(call, Mapping):
                out.append(self._tool(call))
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            self._matched = choice.get("stop_reason")
        return b"".join(out)

    def _tool(self, call: Mapping[str, Any]) -> bytes:
        position = call.get("index", 0)
        function = _mapping(call.get("function"))
        out = b""
        if position not in self._tools:
            out, self._tools[position] = self._switch("tool_use", {
                "type": "tool_use", "id": str(call.get("id") or f"toolu_{position}"),
                "name": str(function.get("name") or ""), "input": {}})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out += _delta(self._tools[position], {"type": "input_json_delta",
                                                  "partial_json": arguments})
        return out


def replay(message: Mapping[str, Any]) -> bytes:
    """A whole Message as the event stream that would have produced it."""
    return b"".join(_replay(message))


def _replay(message: Mapping[str, Any]) -> Iterator[bytes]:
    usage = _mapping(message.get("usage"))
    yield _start(str(message.get("id", "")), str(message.get("model", "")),
                 int(usage.get("input_tokens") or 0))
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type")
        if kind == "tool_use":
            yield _block_start(index, {**block, "input": {}})
            yield _delta(index, {"type": "input_json_delta",
                                 "partial_json": orjson.dumps(block.get("input", {})).decode()})
        elif kind == "thinking":
            yield _block_start(index, EMPTY["thinking"])
            yield _delta(index, {"type": "thinking_delta", "thinking": block.get("thinking", "")})
        else:
            yield _block_start(index, EMPTY["text"])
            yield _delta(index, {"type": "text_delta", "text": block.get("text", "")})
        yield _block_stop(index)
    yield _finish(str(message.get("stop_reason") or "end_turn"), message.get("stop_sequence"),
                  usage)
