"""What an L1 entry holds, and whether it can answer a given request.

An entry is ``{"scope": <scope hash>, "response": <the whole non-streaming response>,
"form": <the stream's skeleton chunks, when it was stored from a stream>}``. The response
keeps every field the backend sent — from a non-streaming answer as it is, from a stream
as ``stream_fold`` assembles it (content, reasoning, refusal, tool calls, logprobs,
finish and stop reasons, usage, fingerprint, unknown fields).

Decision (issue 14, finding 5): an entry is served only where the answer can be given
field for field in the form the request asks for; otherwise the lookup is a miss (and
the fresh response, stored in turn, replaces the entry):

- ``logprobs``, ``top_logprobs``, tools and every sampling parameter are part of the
  scope (``cache_rules``), so a request only ever meets answers made for the same fields;
  streaming or not (and ``stream_options``) are not, and conversions both ways keep every
  field (``stream_fold`` / ``stream_replay``).
- ``usage`` is the one field a stream leaves out unless ``stream_options.include_usage``
  was asked. An entry without usage is not served where usage is due — a non-streaming
  response, or a stream that asked for it: token counts are never invented.
- ``stream_options.continuous_usage_stats`` (usage on every chunk) cannot be replayed:
  never served.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Entry:
    response: Mapping[str, Any]
    form: Mapping[str, Any] | None = None


def encode(scope_hash: str, response: Mapping[str, Any]) -> bytes:
    entry: dict[str, Any] = {"scope": scope_hash, "response": dict(response)}
    form = getattr(response, "form", None)      # stream_fold.Assembled
    if form:
        entry["form"] = form
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes, scope_hash: str) -> Entry | None:
    """The entry if it belongs to ``scope_hash``; ValueError when it is not JSON."""
    entry = json.loads(raw)
    if not isinstance(entry, dict) or entry.get("scope") != scope_hash:
        return None
    response, form = entry.get("response"), entry.get("form")
    if not isinstance(response, dict):
        return None
    return Entry(response, form if isinstance(form, dict) else None)


def stream_options(body: Mapping[str, Any]) -> Mapping[str, Any]:
    options = body.get("stream_options")
    return options if isinstance(options, Mapping) else {}


def include_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streamed answer to this request ends with a usage chunk."""
    return bool(stream_options(body).get("include_usage"))


def serves(entry: Entry, body: Mapping[str, Any]) -> bool:
    """Whether ``entry`` answers the request ``body`` with every field it is due."""
    if body.get("stream") is True:
        options = stream_options(body)
        if options.get("continuous_usage_stats"):
            return False
        usage_due = bool(options.get("include_usage"))
    else:
        usage_due = True
    return not usage_due or entry.response.get("usage") is not None
