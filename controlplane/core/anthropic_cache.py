"""The response cache for ``/v1/messages`` (pure): Messages ride on the chat cache.

* **Key**: the chat completions request the Messages request translates to
  (``anthropic_request.to_chat``) plus a ``synapse_route`` field naming the path. The
  cache's scope hashes every field but the last user message, so a Messages request and
  the chat request it resembles never share an entry (the field differs), while two
  Messages requests that differ only in their last user message share a scope — the
  same rules as chat: temperature ceiling, ``Cache-Control``, the tenant and model.
* **Entry**: a chat completion. A translated answer is one already; a native answer
  (a backend that serves ``/v1/messages`` itself) is turned into one by
  :func:`chat_answer`. A hit is turned back into a Message
  (``anthropic_response.from_chat``), or replayed as a Messages stream
  (``anthropic_stream.replay``).
* Only answers that ended on their own or at ``max_tokens`` are stored (the cache's
  rule: finish ``stop`` / ``length``); tool calls, refusals and broken streams are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

ROUTE_FIELD = "synapse_route"
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
          "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}


def cache_body(chat: Mapping[str, Any]) -> dict[str, Any]:
    """What the response cache keys a Messages request on."""
    return {**chat, ROUTE_FIELD: "/v1/messages"}


def chat_answer(message: Mapping[str, Any]) -> dict[str, Any]:
    """The chat completion an Anthropic Message stands for (what the cache stores)."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": _json(block.get("input"))}})
    chat_message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        chat_message["tool_calls"] = calls
    reason = message.get("stop_reason")
    choice: dict[str, Any] = {"index": 0, "message": chat_message,
                              "finish_reason": FINISH.get(str(reason), reason)}
    if reason == "stop_sequence":
        choice["stop_reason"] = message.get("stop_sequence")
    return {"id": str(message.get("id", "")), "object": "chat.completion",
            "model": message.get("model", ""), "choices": [choice],
            "usage": _usage(message.get("usage"))}


def _usage(usage: Any) -> dict[str, Any]:
    u = usage if isinstance(usage, Mapping) else {}
    read = int(u.get("cache_read_input_tokens") or 0)
    created = int(u.get("cache_creation_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + read + created
    completion = int(u.get("output_tokens") or 0)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if "cache_read_input_tokens" in u:
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


def _json(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()
