"""The response cache for ``/v1/responses`` (pure): stateless calls ride on the chat cache.

* **What may be cached** (``api_calls.responses_no_cache``): no ``previous_response_id``
  (the answer depends on a conversation one engine stored), no ``background``, ``store``
  false (a cached answer gets a new id that no engine stored, so a later continuation
  naming it must not be promised), only function tools. Everything else is a bypass.
* **Key**: the chat request the call amounts to — ``instructions`` and ``input`` as
  messages, every other field as it is (so sampling, tools, ``text.format`` … split the
  scope as they do for chat), plus ``synapse_route`` so a Responses call and a chat
  request never share an entry.
* **Entry**: a chat completion the cache can judge (finish ``stop``, or ``length`` for
  ``incomplete`` at ``max_output_tokens``; usage), carrying the whole Responses object
  in ``synapse_response``. Only answers made of text messages are stored (a function
  call or reasoning item is not), and only when every count of the engine's usage
  (``*_tokens``, and those inside its ``*_details``) passes the engine's rule
  (:func:`usage.count_of`): the request was accounted from an estimate, and a stored
  count comes back as cache-hit tokens on every hit. The engine's object is read
  defensively (any field may have any JSON type); the client gets its answer whatever
  the cache makes of it.
* **A hit** is that object with new ids (``resp_…`` and ``msg_…``) and ``created_at``,
  whole or replayed as the Responses event stream (:func:`replay`). The new response id
  is sealed for the tenant asking, as every id a client sees is
  (:mod:`controlplane.core.response_ids`); no engine stored it, so a continuation naming
  it opens and then meets the engine's 404, as before. The entry itself keeps the
  engine's object as the engine wrote it, never an id sealed for the tenant that filled
  it.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson

from controlplane.core import api_calls
from controlplane.core import usage as usage_mod

ROUTE_FIELD = "synapse_route"
OBJECT_FIELD = "synapse_response"
_NOT_CONTEXT = ("input", "instructions", "model", "stream")


def cache_body(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the cache keys a Responses call on; None when it must not be cached."""
    if api_calls.responses_no_cache(body):
        return None
    rest = {k: v for k, v in body.items() if k not in _NOT_CONTEXT}
    return {**rest, "model": body.get("model"), "stream": body.get("stream") is True,
            "messages": api_calls.responses_messages(body), ROUTE_FIELD: "/v1/responses"}


def _text_only(response: Mapping[str, Any]) -> str | None:
    """The answer's text when every output item is a text message, else None."""
    texts: list[str] = []
    for item in _items(response.get("output")):
        if not isinstance(item, Mapping) or item.get("type") != "message":
            return None
        for part in _items(item.get("content")):
            if not isinstance(part, Mapping) or part.get("type") != "output_text":
                return None
            texts.append(str(part.get("text", "")))
    return "".join(texts)


def _items(value: Any) -> list[Any]:
    """A JSON list's items; anything else (absent, a string, a number) as one item that
    is no text part, so the answer is not stored."""
    if value is None:
        return []
    return value if isinstance(value, list) else [None]


def _finish(response: Mapping[str, Any]) -> str | None:
    """The chat ``finish_reason`` of a finished Responses object, None when unfinished."""
    status = response.get("status")
    if status == "completed":
        return "stop"
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, Mapping) else None
    return "length" if status == "incomplete" and reason == "max_output_tokens" else None


def _counts(usage: Any) -> tuple[int, int] | None:
    """(input, output) tokens of a Responses usage (absent counts 0), or None when a
    count in it is not one by :func:`usage.count_of`."""
    if not isinstance(usage, Mapping) or not _all_count(usage):
        return None
    for key, value in usage.items():
        if key.endswith("_details") and value is not None and (
                not isinstance(value, Mapping) or not _all_count(value)):
            return None
    return (usage_mod.count_of(usage.get("input_tokens")) or 0,
            usage_mod.count_of(usage.get("output_tokens")) or 0)


def _all_count(usage: Mapping[str, Any]) -> bool:
    return all(value is None or usage_mod.count_of(value) is not None
               for key, value in usage.items() if key.endswith("_tokens"))


def entry(response: Mapping[str, Any]) -> dict[str, Any] | None:
    """The chat-shaped entry to store for a finished Responses object (None: not one)."""
    finish, text, counts = _finish(response), _text_only(response), _counts(
        response.get("usage"))
    if finish is None or text is None or counts is None:
        return None
    prompt, completion = counts
    return {"id": str(response.get("id", "")), "object": "chat.completion",
            "model": response.get("model", ""),
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
            OBJECT_FIELD: dict(response)}


def answer(stored: Mapping[str, Any], created_at: int,
           shown: Callable[[str], str]) -> dict[str, Any] | None:
    """The Responses object a hit answers with (new ids, the response's as ``shown``
    makes it for the tenant asking), or None for a foreign entry."""
    original = stored.get(OBJECT_FIELD)
    if not isinstance(original, Mapping):
        return None
    out = copy.deepcopy(dict(original))
    out["id"] = shown("resp_" + uuid.uuid4().hex)
    out["created_at"] = created_at
    for item in out.get("output") or ():
        if isinstance(item, dict):
            item["id"] = "msg_" + uuid.uuid4().hex
    return out


def _event(kind: str, number: int, payload: Mapping[str, Any]) -> bytes:
    data = {**payload, "sequence_number": number, "type": kind}
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def replay(response: Mapping[str, Any]) -> bytes:
    """A whole Responses object as the event stream that would have produced it."""
    return b"".join(_event(kind, n, payload)
                    for n, (kind, payload) in enumerate(_events(response)))


def _events(response: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    start = {**response, "status": "in_progress", "output": [], "usage": None,
             "incomplete_details": None}
    yield "response.created", {"response": start}
    yield "response.in_progress", {"response": start}
    for index, item in enumerate(response.get("output") or ()):
        yield "response.output_item.added", {"output_index": index, "item": {
            **item, "content": [], "status": "in_progress"}}
        for c, part in enumerate(item.get("content") or ()):
            where = {"item_id": item.get("id"), "output_index": index, "content_index": c}
            text = str(part.get("text", ""))
            yield "response.content_part.added", {**where, "part": {**part, "text": ""}}
            yield "response.output_text.delta", {**where, "delta": text, "logprobs": []}
            yield "response.output_text.done", {**where, "text": text, "logprobs": []}
            yield "response.content_part.done", {**where, "part": part}
        yield "response.output_item.done", {"output_index": index, "item": item}
    yield "response.completed", {"response": response}


def completed(event_data: str) -> Mapping[str, Any] | None:
    """The final Responses object carried by a stream's ``response.completed`` (or
    ``.incomplete``) event, else None."""
    if '"response.completed"' not in event_data and '"response.incomplete"' not in event_data:
        return None
    try:
        parsed = orjson.loads(event_data)
    except orjson.JSONDecodeError:
        return None
    response = parsed.get("response") if isinstance(parsed, dict) else None
    return response if isinstance(response, Mapping) else None
