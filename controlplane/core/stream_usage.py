"""Counting streams whose client did not ask for usage.

A stream carries the engine's token counts only when ``stream_options.include_usage``
is set. To account for every request, the control plane sets it on the way to the
engine (:func:`upstream_body`) and removes the usage from what the client receives
(:class:`UsageStripper`), so the client gets exactly the stream it asked for:

* the usage chunk (``"choices": []`` with a ``usage`` object, just before ``[DONE]``)
  is dropped;
* a chunk that carries both choices and a non-null usage (an engine reporting usage on
  every chunk) keeps its choices, without the usage;
* the usage chunk's ``system_fingerprint`` moves onto the finish chunk before it. vLLM
  stamps its fingerprint on each chunk with a non-null ``finish_reason`` only when usage
  was not asked; asked, it stamps the usage chunk alone. So the stripper holds back a
  finish chunk that ends what it has read (found by its bytes, not parsed) until the next
  event: a usage chunk with a fingerprint stamps it (the finish chunk is then parsed,
  once a stream), anything else releases it as it came, and so does the stream's end or
  break (:meth:`UsageStripper.pending`, before the relay's error event). Only that chunk
  waits, and only for the event that follows it (vLLM sends both at once); never more
  than one event is held. With ``n`` > 1 only the last choice's finish chunk is stamped:
  the earlier ones are sent before the fingerprint is known.

Only events that mention ``"usage"`` (and a finish chunk taking a fingerprint) are
parsed; the others pass as they came (and a
chunk made only of whole such events passes as the same bytes object). An event split
over two reads is held until it is complete, but never more than ``HELD_MAX`` bytes of
it. A stream framed with CRLF (servers built on sse-starlette) passes with LF line ends,
the same events: held whole until it ended, it reached the client only then.

A stream that ends without the engine's usage (the client went away, the engine broke
it off) is still accounted: :class:`DeliveredCounter` counts the content deltas relayed to
the client — one per non-empty ``content`` / ``text`` / ``reasoning`` / tool-call
``arguments`` / Responses or Anthropic ``delta`` string, per choice — as the completion
tokens. Engines stream about one token per delta, so this is an estimate (a delta of
several tokens counts one; tokens the engine generated but never sent count none), and
it is accounted as one. Matching bytes rather than parsing keeps it cheap, and it is done
only when the count is read or a batch of bytes is pending.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from controlplane.core import usage as usage_mod

USAGE = usage_mod.USAGE_KEY
USAGE_FIELD = "usage"
SEP = b"\n\n"
NEWLINE = SEP[0]
CR = b"\r"
HELD_MAX = 1 << 20      # an "event" longer than this without a separator: taken as it is
BATCH_BYTES = 1 << 14   # relayed bytes a DeliveredCounter holds before it counts them
# A key whose value is a non-empty string: a piece of the answer in any streamed shape.
_DELTA = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments|delta|'
                    rb'partial_json|thinking)"\s*:\s*"(?!")')
FINISH_KEY = b'"finish_reason"'
FINGERPRINT = "system_fingerprint"
_SPACE = b" \t\r\n"


def asks_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def needs_usage(body: Mapping[str, Any]) -> bool:
    """Whether the engine must be asked for usage the client did not ask for."""
    return body.get("stream") is True and not asks_usage(body)


def upstream_body(body: Mapping[str, Any]) -> bytes:
    """``body`` with ``stream_options.include_usage`` set, as JSON bytes."""
    options = body.get("stream_options")
    merged = {**(options if isinstance(options, Mapping) else {}), "include_usage": True}
    return orjson.dumps({**body, "stream_options": merged})


class UsageStripper:
    """Removes usage from a stream's bytes, chunk by chunk (its fingerprint kept)."""

    __slots__ = ("_finish", "_held")

    def __init__(self) -> None:
        self._held = b""        # the start of an event not yet complete
        self._finish = b""      # a complete finish chunk awaiting the event after it

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (after anything held) to send to the client now."""
        data = self._held + chunk if self._held else chunk
        if CR in data:      # CRLF-framed (sse-starlette's default): passed on as LF
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(SEP)
        if end < 0:
            if len(data) > HELD_MAX:    # no event ends: passed on as it is, never held
                self._held = b""
                return self.pending() + data
            self._held = data
            return b""
        end += len(SEP)
        complete, self._held = data[:end], data[end:]
        if self._finish:
            complete, self._finish = self._finish + complete, b""
        last = _last_event_start(complete)
        if last is not None:
            complete, finish = complete[:last], complete[last:]
            kept = _filtered(finish[:-len(SEP)])
            self._finish = finish if kept is None else kept + SEP
        return _stripped(complete)

    def pending(self) -> bytes:
        """The finish chunk held back for a fingerprint, if any: to be sent before
        anything the relay adds to a stream cut short."""
        finish, self._finish = self._finish, b""
        return finish

    def rest(self) -> bytes:
        """Whatever is held at the end of the stream (a finish chunk, an unterminated
        last event)."""
        held, self._held = self._held, b""
        return self.pending() + held


def _stripped(complete: bytes) -> bytes:
    """Complete events ``complete`` without usage, the fingerprint of a usage chunk
    moved onto the finish chunk just before it."""
    first = complete.find(USAGE)
    if first < 0:
        return complete
    # Events before the first that mentions usage pass as they are, unparsed and
    # unsplit (but the one just before it, which may take its fingerprint): the usage
    # chunk closes a stream, so a whole stream read at once parses one event and
    # splits only its last few.
    start = _event_start(complete, first)
    before = start - 1
    while before >= 0 and complete[before] == NEWLINE:
        before -= 1
    if before >= 0:
        start = _event_start(complete, before)
    kept: list[bytes] = []
    after = False       # whether kept[-1] came just before this event
    for event in complete[start:].split(SEP)[:-1]:
        chunk = _usage_chunk(event)
        if chunk is None or chunk.get("choices"):
            kept.append(event if chunk is None else _without_usage(chunk))
            after = True
            continue
        mark = chunk.get(FINGERPRINT)
        if after and isinstance(mark, str) and _finishes(kept[-1]):
            kept[-1] = _stamped(kept[-1], mark)
        after = False
    return complete[:start] + SEP.join(kept) + SEP if kept else complete[:start]


class DeliveredCounter:
    """Counts the content deltas of a stream's bytes as they are relayed; an event split
    over two reads is counted once it is complete.

    The counting waits until :attr:`count` is read or ``BATCH_BYTES`` are pending: the
    engine's own usage almost always arrives, and then the count is never read, so a
    stream shorter than a batch never pays for the scan (a pattern search over every
    byte relayed, the costliest per-chunk step of a stream). Pending chunks are the
    relayed bytes objects themselves, held by reference until then."""

    __slots__ = ("_count", "_held", "_pending", "_pending_bytes")

    def __init__(self) -> None:
        self._held = b""
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._count = 0

    def feed(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= BATCH_BYTES:
            self._scan()

    @property
    def count(self) -> int:
        """The content deltas of the complete events fed so far."""
        if self._pending:
            self._scan()
        return self._count

    def _scan(self) -> None:
        data = b"".join((self._held, *self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        if CR in data:      # CRLF-framed: its events end as the stripper reads them
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(SEP)
        if end < 0 and len(data) <= HELD_MAX:
            self._held = data
            return
        end = len(data) if end < 0 else end + len(SEP)
        self._count += len(_DELTA.findall(data, 0, end))
        self._held = data[end:]


def _event_start(data: bytes, at: int) -> int:
    """Where the event holding ``data[at]`` starts, as ``data.split(SEP)`` cuts: a run of
    newlines is cut into pairs from its start, so an odd run's last newline begins the
    event (an SSE blank line, kept with it)."""
    cut = data.rfind(SEP, 0, at)
    if cut < 0:
        return 0
    run = cut       # the run of newlines ends at cut + 1: find where it starts
    while run > 0 and data[run - 1] == NEWLINE:
        run -= 1
    return cut + len(SEP) - (cut + len(SEP) - run) % 2


def _payload(event: bytes) -> Any:
    start = event.find(b"data:")
    if start < 0:
        return None
    try:
        return orjson.loads(event[start + 5:])
    except orjson.JSONDecodeError:
        return None


def _usage_chunk(event: bytes) -> dict[str, Any] | None:
    """``event``'s chunk when it carries a non-null usage; None otherwise."""
    if USAGE not in event:
        return None
    chunk = _payload(event)
    if not isinstance(chunk, dict) or chunk.get(USAGE_FIELD) is None:
        return None
    return chunk


def _filtered(event: bytes) -> bytes | None:
    """``event`` without its usage; None when it was only the usage chunk."""
    chunk = _usage_chunk(event)
    if chunk is None:
        return event
    return _without_usage(chunk) if chunk.get("choices") else None


def _without_usage(chunk: dict[str, Any]) -> bytes:
    chunk.pop(USAGE_FIELD)
    return b"data: " + orjson.dumps(chunk)


def _finishes(event: bytes, start: int = 0) -> bool:
    """Whether ``event`` (from ``start``) has a ``finish_reason`` that is a string, by
    its bytes: a quote inside a JSON string is escaped, so these bytes are the key."""
    at = event.find(FINISH_KEY, start)
    while at >= 0:
        at += len(FINISH_KEY)
        while at < len(event) and event[at] in _SPACE:
            at += 1
        if event[at:at + 1] == b":":
            at += 1
            while at < len(event) and event[at] in _SPACE:
                at += 1
            if event[at:at + 1] == b'"':
                return True
        at = event.find(FINISH_KEY, at)
    return False


def _last_event_start(complete: bytes) -> int | None:
    """Where the last event of ``complete`` (complete events) starts, when it is a finish
    chunk; None otherwise."""
    if len(complete) <= len(SEP) or complete[-len(SEP) - 1] == NEWLINE:
        return None
    start = _event_start(complete, len(complete) - len(SEP) - 1)
    return start if _finishes(complete, start) else None


def _stamped(event: bytes, fingerprint: str) -> bytes:
    """The finish chunk ``event`` with the engine's ``fingerprint``, placed as vLLM
    places it (after ``choices``); as it was when it has one already."""
    chunk = _payload(event)
    if not isinstance(chunk, dict) or chunk.get(FINGERPRINT) is not None:
        return event
    chunk[FINGERPRINT] = fingerprint
    return b"data: " + orjson.dumps(chunk)
