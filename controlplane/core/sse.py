"""Server-sent events for OpenAI streams: parse, assemble, replay.

* :class:`SSEParser` turns upstream bytes, in whatever pieces they arrive, into the
  ``data:`` payloads of complete events (``[DONE]`` included, as a string).
* :class:`StreamAssembler` folds ``chat.completion.chunk`` / ``text_completion`` chunks
  into the one non-streaming response they add up to (content, tool calls, finish
  reasons, usage), which is what the response cache stores; ``complete`` is true only
  after ``[DONE]`` with every choice finished by ``stop`` or ``length``.
* :func:`replay` renders a stored non-streaming response as a valid stream: a role
  chunk, the content, a finish chunk, a usage chunk and ``data: [DONE]``.

The proxy itself forwards upstream bytes untouched; these helpers only observe them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

DONE = "[DONE]"
CACHEABLE_FINISH = frozenset({"stop", "length"})


class SSEParser:
    """Incremental SSE parser: ``feed(bytes)`` returns the data of each completed event."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        if b"\r" in self._buf:
            self._buf = self._buf.replace(b"\r\n", b"\n")
        out: list[str] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return out
            event, self._buf = self._buf[:end], self._buf[end + 2:]
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n")
                    if line.startswith(b"data:")]
            if data:
                out.append(b"\n".join(data).decode("utf-8", "replace"))


def event(payload: Mapping[str, Any] | str) -> bytes:
    """One SSE event carrying ``payload`` (a JSON object, or ``[DONE]``)."""
    body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + body + b"\n\n"


def error_event(message: str, error_type: str = "upstream_error",
                code: str | None = "stream_interrupted") -> bytes:
    """The event that ends a stream broken mid-way (the OpenAI error object)."""
    return event({"error": {"message": message, "type": error_type, "param": None,
                            "code": code}})


class StreamAssembler:
    """Folds stream chunks into one non-streaming-shaped response."""

    def __init__(self) -> None:
        self.done = False
        self.error: Any = None
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self._kind = "chat"

    def add_data(self, data: str) -> None:
        if data == DONE:
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.error = "invalid JSON in stream"
            return
        if isinstance(chunk, dict):
            self.add_chunk(chunk)

    def add_chunk(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk:
            self.error = chunk["error"]
            return
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self._meta:
                self._meta[key] = chunk[key]
        if chunk.get("object") == "text_completion":
            self._kind = "completions"
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: Mapping[str, Any]) -> None:
        idx = int(choice.get("index", 0))
        acc = self._choices.setdefault(idx, {"content": [], "role": None, "tools": {},
                                             "finish_reason": None})
        if "text" in choice:
            self._kind = "completions"
            acc["content"].append(str(choice.get("text") or ""))
        delta = choice.get("delta") or {}
        if delta.get("role"):
            acc["role"] = delta["role"]
        if delta.get("content"):
            acc["content"].append(str(delta["content"]))
        for call in delta.get("tool_calls") or ():
            self._add_tool_call(acc["tools"], call)
        if choice.get("finish_reason"):
            acc["finish_reason"] = choice["finish_reason"]

    @staticmethod
    def _add_tool_call(tools: dict[int, dict[str, Any]], call: Mapping[str, Any]) -> None:
        slot = tools.setdefault(int(call.get("index", 0)), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            slot["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            slot["function"]["arguments"] += fn["arguments"]

    @property
    def complete(self) -> bool:
        """[DONE] seen, no error, and every choice finished with stop or length."""
        return (self.done and self.error is None and bool(self._choices)
                and all(c["finish_reason"] in CACHEABLE_FINISH
                        for c in self._choices.values()))

    def response(self) -> dict[str, Any]:
        chat = self._kind == "chat"
        choices = [self._render_choice(i, c, chat) for i, c in sorted(self._choices.items())]
        out: dict[str, Any] = {
            "id": self._meta.get("id", ""),
            "object": "chat.completion" if chat else "text_completion",
            "created": self._meta.get("created", int(time.time())),
            "model": self._meta.get("model", ""),
            "choices": choices,
        }
        if "system_fingerprint" in self._meta:
            out["system_fingerprint"] = self._meta["system_fingerprint"]
        if self._usage is not None:
            out["usage"] = self._usage
        return out

    @staticmethod
    def _render_choice(idx: int, acc: Mapping[str, Any], chat: bool) -> dict[str, Any]:
        text = "".join(acc["content"])
        if not chat:
            return {"index": idx, "text": text, "logprobs": None,
                    "finish_reason": acc["finish_reason"]}
        message: dict[str, Any] = {"role": acc["role"] or "assistant", "content": text}
        if acc["tools"]:
            message["tool_calls"] = [acc["tools"][k] for k in sorted(acc["tools"])]
            if not text:
                message["content"] = None
        return {"index": idx, "message": message, "logprobs": None,
                "finish_reason": acc["finish_reason"]}


def assemble(events: Iterable[str]) -> StreamAssembler:
    asm = StreamAssembler()
    for data in events:
        asm.add_data(data)
    return asm


def replay(response: Mapping[str, Any], include_usage: bool = True) -> Iterator[bytes]:
    """A stored non-streaming response as SSE events, ending with ``data: [DONE]``."""
    chat = response.get("object", "chat.completion") != "text_completion"
    base = {"id": response.get("id", ""), "created": response.get("created", int(time.time())),
            "model": response.get("model", ""),
            "object": "chat.completion.chunk" if chat else "text_completion"}
    for choice in response.get("choices") or ():
        yield from _replay_choice(base, choice, chat)
    if include_usage and response.get("usage") is not None:
        yield event({**base, "choices": [], "usage": response["usage"]})
    yield event(DONE)


def _replay_choice(base: Mapping[str, Any], choice: Mapping[str, Any],
                   chat: bool) -> Iterator[bytes]:
    idx = choice.get("index", 0)
    finish = choice.get("finish_reason")
    if not chat:
        yield event({**base, "choices": [{"index": idx, "text": choice.get("text", ""),
                                          "logprobs": None, "finish_reason": None}]})
        yield event({**base, "choices": [{"index": idx, "text": "", "logprobs": None,
                                          "finish_reason": finish}]})
        return
    message = choice.get("message") or {}
    role = message.get("role", "assistant")
    yield event({**base, "choices": [{"index": idx, "delta": {"role": role, "content": ""},
                                      "logprobs": None, "finish_reason": None}]})
    delta: dict[str, Any] = {}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{**call, "index": i}
                               for i, call in enumerate(message["tool_calls"])]
    if delta:
        yield event({**base, "choices": [{"index": idx, "delta": delta, "logprobs": None,
                                          "finish_reason": None}]})
    yield event({**base, "choices": [{"index": idx, "delta": {}, "logprobs": None,
                                      "finish_reason": finish}]})
