"""The engine's ``usage`` of an answer, read from the answer's last bytes.

Both a whole answer (JSON) and a stream (the ``include_usage`` chunk just before
``data: [DONE]``) end with the usage object, so the proxy keeps the last
:data:`TAIL_BYTES` of what it passed on and this module reads the counts from there
without parsing the answer: ``prompt_tokens``, ``completion_tokens`` and
``prompt_tokens_details.cached_tokens`` (vLLM with ``--enable-prompt-tokens-details``,
and the simulator). The router compares them with its predictions.
"""

from __future__ import annotations

import dataclasses
import re

TAIL_BYTES = 1024
_NUMBER = {key: re.compile(rb'"' + key.encode() + rb'"\s*:\s*(\d+)')
           for key in ("prompt_tokens", "completion_tokens", "cached_tokens")}


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None       # None: the engine did not report it


def _number(key: str, text: bytes) -> int | None:
    m = _NUMBER[key].search(text)
    return int(m.group(1)) if m else None


def from_tail(data: bytes) -> Usage | None:
    """The last usage object in ``data`` (an answer or its tail), or None."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    text = data[at:]
    prompt = _number("prompt_tokens", text)
    if prompt is None:
        return None
    return Usage(prompt, _number("completion_tokens", text) or 0,
                 _number("cached_tokens", text))
