"""OpenAI chat completion → Anthropic Message (pure), and the rules both the whole
answer and the stream (``anthropic_stream``) follow.

* **Content**: the reasoning text (vLLM's ``reasoning`` / ``reasoning_content``) as a
  ``thinking`` block, the text as a ``text`` block, each tool call as a ``tool_use`` block
  (``input`` is the parsed arguments: arguments that are not a JSON object are the
  backend's fault, :class:`controlplane.errors.UpstreamError`). No content at all is one
  empty text block, Anthropic's own shape for an empty answer.
* **Stop reason** (:func:`stop_reason`): ``length`` → ``max_tokens``; a tool call →
  ``tool_use``; a matched stop string (vLLM reports it in ``stop_reason``) →
  ``stop_sequence`` with the string; ``content_filter`` → ``refusal``; else
  ``end_turn``. An OpenAI backend that does not report the stop string gives
  ``end_turn`` for it: the two are indistinguishable from its answer.
* **Usage** (:func:`usage`): Anthropic counts ``input_tokens`` without the cached part,
  so, as vLLM's own translation does, ``cache_read_input_tokens = cached_tokens`` and
  ``cache_creation_input_tokens = created_cache_tokens`` when the backend reports them
  (``prompt_tokens_details``) and ``input_tokens`` is ``prompt_tokens`` less both;
  ``output_tokens = completion_tokens``. Each count passes the engine's rule
  (:func:`usage.count_of`); Anthropic's usage always carries ``input_tokens`` and
  ``output_tokens`` as integers, so a count that does not pass (a string, a fraction, a
  negative or huge number) is shown as 0 there, and a cache count that does not pass is
  left out. The client still gets its answer; the request is billed from the control
  plane's estimate, since the same counts fail :func:`usage.from_tail` on the engine's
  bytes.
* **Id**: ``msg_`` plus the chat id without its ``chatcmpl-`` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from controlplane import errors
from controlplane.core import usage as usage_mod


def message_id(chat_id: Any) -> str:
    base = str(chat_id or "").removeprefix("chatcmpl-")
    return "msg_" + (base or "synapse")


def stop_reason(finish_reason: Any, matched: Any, tool_used: bool) -> tuple[str, str | None]:
    """(``stop_reason``, ``stop_sequence``) of an answer that ended with ``finish_reason``
    (``matched`` is vLLM's ``stop_reason``: the stop string, or a token id / None)."""
    if finish_reason == "length":
        return "max_tokens", None
    if tool_used or finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if isinstance(matched, str):
        return "stop_sequence", matched
    if finish_reason == "content_filter":
        return "refusal", None
    return "end_turn", None


def usage(chat_usage: Any) -> dict[str, int]:
    if not isinstance(chat_usage, Mapping):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = usage_mod.count_of(chat_usage.get("prompt_tokens")) or 0
    out = {"output_tokens": usage_mod.count_of(chat_usage.get("completion_tokens")) or 0}
    details = chat_usage.get("prompt_tokens_details")
    if isinstance(details, Mapping):
        for field, name in (("created_cache_tokens", "cache_creation_input_tokens"),
                            ("cached_tokens", "cache_read_input_tokens")):
            value = usage_mod.count_of(details.get(field))
            if value is not None:
                out[name] = value
                prompt -= value
    return {"input_tokens": max(0, prompt), **out}


def tool_input(arguments: Any) -> dict[str, Any]:
    """The ``input`` of a ``tool_use`` block from a call's JSON ``arguments``."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise errors.UpstreamError("the backend answered a tool call whose arguments are "
                                   "not a JSON object", code="bad_tool_arguments")
    return value


def reasoning_of(message: Mapping[str, Any]) -> str | None:
    value = message.get("reasoning_content") or message.get("reasoning")
    return value if isinstance(value, str) and value else None


def from_chat(chat: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """The Anthropic Message for a chat completion (its first choice)."""
    choices = chat.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise errors.UpstreamError("the backend's answer has no choices", code="bad_answer")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, Mapping):
        message = {}
    content: list[dict[str, Any]] = []
    thinking = reasoning_of(message)
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": str(call.get("id") or ""),
                        "name": str(function.get("name") or ""),
                        "input": tool_input(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"),
                                   bool(calls))
    return {"id": message_id(chat.get("id")), "type": "message", "role": "assistant",
            "content": content or [{"type": "text", "text": ""}],
            "model": model or chat.get("model") or "", "stop_reason": reason,
            "stop_sequence": sequence, "usage": usage(chat.get("usage"))}
