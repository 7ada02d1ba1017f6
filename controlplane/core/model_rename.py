"""Model names on the wire: the upstream's own name out, the client's name back.

A static upstream may know a model by another name (``model_names``: the canonical
``meta-llama/Llama-3.1-8B-Instruct`` is ``llama3.1:8b`` on Ollama). The request body sent
to it carries its name (:func:`in_body`); its answer carries the name the client asked
for, whole (:func:`in_body` again) or streamed (:class:`StreamRenamer`). Only then is a
body parsed and re-serialised: without a mapping the bytes pass untouched.

Where the name sits: ``model`` at the top (chat, completions, embeddings and their
chunks), and inside ``message`` / ``response`` (Anthropic Messages' ``message_start``,
the Responses API's ``response.*`` events).
"""

from __future__ import annotations

from typing import Any

import orjson

from controlplane.core import stream_usage

_NESTED = ("message", "response")


def _rename(obj: Any, name: str) -> bool:
    if not isinstance(obj, dict):
        return False
    changed = False
    if isinstance(obj.get("model"), str):
        obj["model"], changed = name, True
    for key in _NESTED:
        inner = obj.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("model"), str):
            inner["model"], changed = name, True
    return changed


def in_body(data: bytes, name: str) -> bytes:
    """``data`` (a JSON object) with its model named ``name``; anything else unchanged."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    return orjson.dumps(obj) if _rename(obj, name) else data


class StreamRenamer:
    """Renames the model in the ``data:`` lines of an event stream, one whole event at a
    time: a chunk's unfinished last event waits for the chunk that completes it.

    Each byte is searched for an event end once (plus the separator's width of overlap),
    so a long event costs linear work. An event still unfinished past
    ``stream_usage.HELD_MAX`` bytes is passed on as it is, unrenamed, and so is the rest
    of it up to its end; the events after it are renamed again."""

    __slots__ = ("_buffer", "_from", "_name", "_passing", "_tail", "scanned")

    def __init__(self, name: str) -> None:
        self._name = name
        self._buffer = bytearray()
        self._from = 0          # where the search for an event end resumes in _buffer
        self._passing = False   # inside an event given up on: passed through to its end
        self._tail = b""        # the last bytes passed through (a separator may span reads)
        self.scanned = 0        # bytes searched for an event end (the bound tests count it)

    @property
    def held(self) -> int:
        """Bytes of an unfinished event held."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events received so far, renamed (b"" while one is unfinished)."""
        if self._passing:
            return self._pass(chunk)
        buf = self._buffer
        buf += chunk
        start = self._from
        self.scanned += len(buf) - start
        lf, crlf = buf.rfind(b"\n\n", start), buf.rfind(b"\r\n\r\n", start)
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:
            if len(buf) > stream_usage.HELD_MAX:    # no event ends: passed on as it is
                out = bytes(buf)
                self._buffer, self._from = bytearray(), 0
                self._passing, self._tail = True, out[-3:]
                return out
            self._from = max(len(buf) - 3, 0)
            return b""
        data = bytes(buf[:end])
        del buf[:end]
        self._from = max(len(buf) - 3, 0)
        return b"\n".join(self._line(line) for line in data.split(b"\n"))

    def _pass(self, chunk: bytes) -> bytes:
        """``chunk`` inside an event given up on: as it is up to that event's end, the
        events after it renamed."""
        seen = self._tail + chunk
        self.scanned += len(seen)
        ends = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n")
                if (i := seen.find(sep)) >= 0]
        if not ends:
            self._tail = seen[-3:]
            return chunk
        cut = min(ends) - len(self._tail)
        self._passing, self._tail = False, b""
        return chunk[:cut] + self.feed(chunk[cut:])

    def rest(self) -> bytes:
        """What is left after the stream ended (an unfinished event, passed as it is)."""
        rest, self._buffer, self._from = bytes(self._buffer), bytearray(), 0
        return rest

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            return line
        renamed = in_body(payload, self._name)
        if renamed is payload:
            return line
        return b"data: " + renamed + (b"\r" if line.endswith(b"\r") else b"")
