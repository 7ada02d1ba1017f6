"""Server-sent events for OpenAI streams: parse, assemble, replay.

* :class:`SSEParser` turns upstream bytes, in whatever pieces they arrive, into the
  ``data:`` payloads of complete events (``[DONE]`` included, as a string).
* :class:`StreamAssembler` folds ``chat.completion.chunk`` / ``text_completion`` chunks
  into the one non-streaming response they add up to, which is what the response cache
  stores: every field survives (content, reasoning, refusal, tool calls, logprobs, finish
  and stop reasons, usage, fingerprint and any field we do not know — ``stream_fold``).
  ``complete`` is true only after ``[DONE]`` with every choice finished by ``stop`` or
  ``length``. The response also records the stream's *form* (one skeleton chunk per
  kind), so that a replay has the shape of the backend's own stream.
* :func:`replay` renders a stored response as a stream (``stream_replay``).

The proxy itself forwards upstream bytes untouched; these helpers only observe them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from controlplane.core import stream_fold, stream_replay
from synapse_common import clock

DONE = "[DONE]"
CACHEABLE_FINISH = frozenset({"stop", "length"})
Assembled = stream_fold.Assembled
replay = stream_replay.replay


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
    return stream_replay.event(payload)


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
        self._fold = stream_fold.Fold()

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
        self._fold.add(chunk)

    @property
    def complete(self) -> bool:
        """[DONE] seen, no error, and every choice finished with stop or length."""
        finishes = self._fold.finish_reasons()
        return (self.done and self.error is None and bool(finishes)
                and all(f in CACHEABLE_FINISH for f in finishes))

    def response(self) -> stream_fold.Assembled:
        return self._fold.response(default_created=int(clock.wall()))


def assemble(events: Iterable[str]) -> StreamAssembler:
    asm = StreamAssembler()
    for data in events:
        asm.add_data(data)
    return asm
