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
    time: a chunk's unfinished last event waits for the chunk that completes it."""

    __slots__ = ("_buffer", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events received so far, renamed (b"" while one is unfinished)."""
        data = self._buffer + chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:
            self._buffer = data
            return b""
        self._buffer = data[end:]
        return b"\n".join(self._line(line) for line in data[:end].split(b"\n"))

    def rest(self) -> bytes:
        """What is left after the stream ended (an unfinished event, passed as it is)."""
        rest, self._buffer = self._buffer, b""
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
