"""How a backend's streamed answer looks on each path: where its first token is, and how
a complete stream ends (pure; :mod:`controlplane.core.dispatch` asks these per attempt).

==========================  ==========================  ===================================
path                        first token                 a complete stream ends with
==========================  ==========================  ===================================
``/v1/chat/completions``    2nd event (the 1st is the   ``data: [DONE]``
                            role-only delta)
``/v1/completions``,        1st event                   ``data: [DONE]``
``/v1/audio/...``
``/v1/responses``           5th event (created,         ``response.completed`` (or
                            in_progress, output item,   ``.incomplete`` / ``.failed``: the
                            content part come first)    backend finished either way)
``/v1/messages``            3rd event (message_start,   ``message_stop``
                            content_block_start)
not SSE (``audio/wav``)     the first chunk             the transport's own framing
==========================  ==========================  ===================================

An event stream cut before its end marker is the backend's failure (never cached, never
a complete answer to the client); a body that is not an event stream is complete when the
transport says so (Content-Length or chunked framing), so any chunk ends it well.
"""

from __future__ import annotations

EVENT_STREAM = "text/event-stream"
DONE = (b"[DONE]",)
_FIRST_TOKEN = {"/v1/chat/completions": 2, "/v1/responses": 5, "/v1/messages": 3}
_ENDS = {
    "/v1/responses": (b'"response.completed"', b'"response.incomplete"',
                      b'"response.failed"'),
    "/v1/messages": (b"message_stop",),
}


def first_token_event(path: str) -> int:
    """The number of the event that carries a stream's first token on ``path``."""
    return _FIRST_TOKEN.get(path, 1)


def events_in(chunk: bytes, content_type: str) -> int:
    """Events begun in ``chunk``: ``data:`` lines of an event stream, else one per chunk."""
    return chunk.count(b"data:") if content_type == EVENT_STREAM else 1


def end_of(path: str) -> str:
    """What a complete event stream on ``path`` ends with, for error messages."""
    return _ENDS.get(path, DONE)[0].decode().strip('"')


def ended(path: str, content_type: str, tail: bytes) -> bool:
    """Whether a stream whose last bytes are ``tail`` reached its proper end."""
    if content_type != EVENT_STREAM:
        return True
    return any(marker in tail for marker in _ENDS.get(path, DONE))
