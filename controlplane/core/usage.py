"""The engine's ``usage`` of an answer, read from the answer's last bytes.

Both a whole answer (JSON) and a stream (the ``include_usage`` chunk just before
``data: [DONE]``) end with the usage object, so the proxy keeps the last
:data:`TAIL_BYTES` of what it passed on and this module reads the counts from there
without parsing the answer: ``prompt_tokens``, ``completion_tokens`` and
``prompt_tokens_details.cached_tokens`` (vLLM with ``--enable-prompt-tokens-details``,
and the simulator), or the same counts under the names of the Responses and Anthropic
Messages APIs. The router compares them with its predictions.

A stream that ended without the engine's usage (its client went away, the engine broke it
off) is accounted from the control plane's own figures instead: the prompt's token count
and the content deltas relayed to the client, a :class:`Usage` marked ``estimated``.

The engine is not trusted with the size of its counts: one that is not a whole number
from 0 to :data:`MAX_COUNT` (negative, fractional, a string, one larger than SQLite and
protobuf hold, more digits than Python will make an int of) makes the whole usage
absent, so the request is accounted from that estimate like any other answer without
usage. A count no store can hold on a usage row would make every later flush of the
usage store fail, every tenant's, and ``GetUsage`` fail for all; digits are counted
before any int is built. A stored answer's usage, counted again on every cache hit,
passes the same rule (:func:`count_of`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from controlplane.core import validation

TAIL_BYTES = 1024
USAGE_KEY = b'"usage"'    # as it appears in an answer's JSON
# The usage key's value: an object, with objects one level inside (the token details).
# (Unrolled: runs of [^{}] match in one step; an alternation per byte cost a request
# more than the rest of its accounting.)
_OBJECT = re.compile(rb'\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
_COUNTS = re.compile(rb'"(prompt_tokens|completion_tokens|cached_tokens|input_tokens|'
                     rb'output_tokens|cache_read_input_tokens|cache_creation_input_tokens)"'
                     rb'\s*:\s*([^,}]*)')    # the raw value, judged by _counts
# A count as it may be written: a whole number (JSON does not tell 3 from 3.0), its
# leading zeros apart, of at most as many digits as MAX_COUNT (bounded backtracking).
MAX_COUNT = validation.MAX_COUNT    # the largest count a request may ask for, too
_DIGITS = len(str(MAX_COUNT))
_WHOLE = re.compile(rb'0*(\d{1,%d})(?:\.0*)?' % _DIGITS)


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None       # None: the engine did not report it
    estimated: bool = False         # the control plane's count, not the engine's


def from_tail(data: bytes) -> Usage | None:
    """The last usage object in ``data`` (an answer or its tail), or None.

    The last ``"usage"`` *key with an object value*, and the counts inside that object
    only: the word also comes as a string a client can make the engine echo after the
    usage object (vLLM puts ``prompt_logprobs`` after it, whose ``decoded_token`` may be
    ``"usage"``), and taking that one read no counts, so the request went unaccounted,
    its budget and token limit unspent."""
    end = len(data)
    while True:
        at = data.rfind(USAGE_KEY, 0, end)
        if at < 0:
            return None
        value = _OBJECT.match(data, at + len(USAGE_KEY))
        if value is not None:
            break
        end = at        # a string "usage" (or a key of another value): look further back
    # the counts inside that object only: what follows it is the client's to shape too
    counts = _counts(_COUNTS.findall(data, value.start(1), value.end(1)))
    if counts is None:
        return None
    prompt = counts.get(b"prompt_tokens")
    if prompt is None:
        return _input_output(counts)
    return Usage(prompt, counts.get(b"completion_tokens", 0), counts.get(b"cached_tokens"))


def count_of(value: object) -> int | None:
    """An engine's count as JSON decoded it (an answer the response cache stored, say),
    taken by the same rule as :func:`from_tail`'s: a whole number from 0 to
    :data:`MAX_COUNT`, else None. The one home of that rule for decoded counts, so a count
    the engine's answer could not pass as usage cannot come back through a stored copy."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None     # nan and inf are not whole either
    return int(value) if 0 <= value <= MAX_COUNT else None


def _counts(found: list[tuple[bytes, bytes]]) -> dict[bytes, int] | None:
    """The counts by name, or None when one of them is not a count from 0 to
    :data:`MAX_COUNT` (a ``null`` is a count not given)."""
    out: dict[bytes, int] = {}
    for name, raw in found:
        if raw.isdigit() and len(raw) <= _DIGITS:  # as engines write them: no regex needed
            count = int(raw)
        else:
            raw = raw.strip()
            if raw == b"null":
                continue
            whole = _WHOLE.fullmatch(raw)
            if whole is None:
                return None
            count = int(whole.group(1))     # at most MAX_COUNT's digits: never a huge int
        if count > MAX_COUNT:
            return None
        out[name] = count
    return out


def _input_output(counts: dict[bytes, int]) -> Usage | None:
    """Responses' and Anthropic's names: ``input_tokens`` / ``output_tokens``; Anthropic
    counts the cached prompt apart (``cache_read_input_tokens``, and the tokens written to
    its cache, ``cache_creation_input_tokens``), Responses inside ``input_tokens``
    (``input_tokens_details.cached_tokens``)."""
    given = counts.get(b"input_tokens")
    if given is None:
        return None
    read = counts.get(b"cache_read_input_tokens")
    prompt = given + (read or 0) + counts.get(b"cache_creation_input_tokens", 0)
    return Usage(prompt, counts.get(b"output_tokens", 0), counts.get(b"cached_tokens", read))
