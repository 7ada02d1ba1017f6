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

from controlplane.core import stream_fold, stream_replay, stream_usage
from synapse_common import clock

DONE = "[DONE]"
CACHEABLE_FINISH = frozenset({"stop", "length"})
# Bytes of event data one assembler folds; a longer answer is not assembled nor cached
# (the cache has no other bound on an entry, and the fold holds all of it in memory).
ASSEMBLED_MAX = 16 << 20
Assembled = stream_fold.Assembled
replay = stream_replay.replay


class SSEParser:
    """Incremental SSE parser: ``feed(bytes)`` returns the data of each completed event.

    Each byte is searched for an event end once (plus the separator's width of overlap
    with the next read), so a long event costs linear work, not a rescan per read. An
    event still unfinished past ``stream_usage.HELD_MAX`` bytes is given up: the parser
    is ``failed``, drops what it holds and reports no further event, so the stream never
    assembles into a cacheable answer (no ``[DONE]``) while its bytes flow on untouched.
    """

    __slots__ = ("_buf", "_cr", "_from", "failed", "scanned")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cr = False        # the last read ended in CR: it may pair with the next LF
        self._from = 0          # where the search for an event end resumes in _buf
        self.failed = False
        self.scanned = 0        # bytes searched for an event end (the bound tests count it)

    @property
    def held(self) -> int:
        """Bytes of an unfinished event held."""
        return len(self._buf) + self._cr

    def feed(self, chunk: bytes) -> list[str]:
        if self.failed or not chunk:
            return []
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, self._cr = chunk[:-1], True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf = self._buf
        buf += chunk
        out: list[str] = []
        start, search = 0, self._from
        while True:
            end = buf.find(b"\n\n", search)
            if end < 0:
                self.scanned += len(buf) - search
                break
            self.scanned += end + 2 - search
            data = [line[5:].removeprefix(b" ")
                    for line in bytes(buf[start:end]).split(b"\n")
                    if line.startswith(b"data:")]
            if data:
                out.append(b"\n".join(data).decode("utf-8", "replace"))
            start = search = end + 2
        del buf[:start]
        self._from = max(len(buf) - 1, 0)   # a lone LF at the end may start a separator
        if self.held > stream_usage.HELD_MAX:
            self.failed, self._cr, self._from = True, False, 0
            self._buf = bytearray()
        return out


def event(payload: Mapping[str, Any] | str) -> bytes:
    """One SSE event carrying ``payload`` (a JSON object, or ``[DONE]``)."""
    return stream_replay.event(payload)


def error_event(message: str, error_type: str = "upstream_error",
                code: str | None = "stream_interrupted") -> bytes:
    """The event that ends a stream broken mid-way (the OpenAI error object)."""
    return event({"error": {"message": message, "type": error_type, "param": None,
                            "code": code}})


class StreamAssembler:
    """Folds stream chunks into one non-streaming-shaped response.

    Past ``ASSEMBLED_MAX`` bytes of event data it stops folding and records an error,
    so the answer is never ``complete`` (not cached); the stream itself is unaffected."""

    def __init__(self) -> None:
        self.done = False
        self.error: Any = None
        self.assembled = 0      # bytes of event data folded
        self._fold = stream_fold.Fold()

    def add_data(self, data: str) -> None:
        if data == DONE:
            self.done = True
            return
        if self.error is not None:
            return
        if self.assembled + len(data) > ASSEMBLED_MAX:
            self.error = "stream too long to assemble"
            return
        self.assembled += len(data)
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
