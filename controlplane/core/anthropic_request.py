"""Anthropic Messages request → OpenAI chat completions request (pure).

For backends that do not serve ``/v1/messages`` themselves (vLLM 0.32 does; an older
vLLM, Ollama's OpenAI API, TGI do not), the control plane translates the request,
sends chat completions, and translates the answer back (``anthropic_response``,
``anthropic_stream``). The mapping:

==========================  ================================================================
Anthropic                   chat completions
==========================  ================================================================
``system`` (str | blocks)   a first ``system`` message (text blocks joined)
``messages[].content`` str  the same string
text / image blocks         ``text`` / ``image_url`` parts (base64 as a ``data:`` URL)
``tool_use`` (assistant)    ``tool_calls`` ``{"id", "type": "function", "function":
                            {"name", "arguments": JSON}}``; the text beside it is content
``tool_result`` (user)      one ``tool`` message each (``tool_call_id``), placed before the
                            user's other content, as chat wants them right after the call;
                            ``is_error`` prefixes the content with ``Error:``
``thinking`` blocks         dropped (the backend cannot read them back)
``tools``                   ``{"type": "function", "function": {"name", "description",
                            "parameters": input_schema}}``; server tools are refused
``tool_choice``             ``auto`` → ``"auto"``, ``any`` → ``"required"``, ``tool`` →
                            the named function, ``none`` → ``"none"``;
                            ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``
``max_tokens`` (required)   ``max_tokens`` (what vLLM, Ollama and TGI all read)
``stop_sequences``          ``stop``
``temperature``, ``top_p``  the same; ``top_k`` passes as vLLM's extension field
``metadata.user_id``        ``user`` (the router's session affinity reads it)
``stream``                  ``stream`` plus ``stream_options.include_usage`` (the usage
                            the final ``message_delta`` reports); not a boolean: 400
==========================  ================================================================

Other fields (``thinking``, ``service_tier``, ``container``, ``mcp_servers`` …) are
ignored, as an OpenAI-compatible backend has nothing to map them to. Invalid requests
raise :class:`controlplane.errors.BadRequest` naming the field, which
``anthropic_errors`` renders as ``invalid_request_error``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from controlplane import errors
from controlplane.core import validation

TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _require(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise errors.BadRequest(message, param=param)


def to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """The chat completions request equivalent to a Messages request ``body``."""
    model = body.get("model")
    _require(isinstance(model, str) and bool(model), "model: a model name is required",
             "model")
    max_tokens = body.get("max_tokens")
    _require(isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
             and 1 <= max_tokens <= validation.MAX_COUNT,
             f"max_tokens: an integer of at least 1 and at most {validation.MAX_COUNT} is "
             "required", "max_tokens")
    stream = body.get("stream")
    _require(stream is None or isinstance(stream, bool), "stream: must be a boolean",
             "stream")
    chat: dict[str, Any] = {"model": model, "messages": _messages(body),
                            "max_tokens": max_tokens}
    _sampling(body, chat)
    _tools(body, chat)
    if stream is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def to_tokenize(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/tokenize`` request (vLLM's chat form) that counts the prompt of a
    ``count_tokens`` request ``body``: its model, messages and tools as :func:`to_chat`
    translates them (the same 400s, a ``stream`` that is no boolean included), with the
    generation prompt, as the engine counts a Message's ``input_tokens``. ``max_tokens``
    is not asked for, as Anthropic's ``count_tokens`` takes none; a boolean ``stream``
    changes nothing (a count is one answer)."""
    chat = to_chat({**body, "max_tokens": 1})
    out = {"model": chat["model"], "messages": chat["messages"], "add_generation_prompt": True}
    if "tools" in chat:
        out["tools"] = chat["tools"]
    return out


def _sampling(body: Mapping[str, Any], chat: dict[str, Any]) -> None:
    for name in ("temperature", "top_p", "top_k"):
        value = body.get(name)
        if value is not None:
            _require(isinstance(value, int | float) and not isinstance(value, bool),
                     f"{name}: a number is required", name)
            chat[name] = value
    stop = body.get("stop_sequences")
    if stop is not None:
        _require(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                 "stop_sequences: a list of strings is required", "stop_sequences")
        if stop:
            chat["stop"] = stop
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _system_text(system)})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.BadRequest("messages: a non-empty list is required", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        _require(role in ("user", "assistant"),
                 f"messages.{i}.role: 'user' or 'assistant' is required", "messages")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            out.extend(_assistant(content, i) if role == "assistant" else _user(content, i))
        else:
            raise errors.BadRequest(f"messages.{i}.content: a string or a list of blocks is "
                                    "required", param="messages")
    return out


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    _require(isinstance(system, list) and all(
        isinstance(b, Mapping) and b.get("type") == "text" for b in system),
        "system: a string or a list of text blocks is required", "system")
    return "\n".join(str(b.get("text", "")) for b in system)


def _block_type(block: Any, i: int) -> str:
    kind = block.get("type") if isinstance(block, Mapping) else None
    _require(isinstance(kind, str), f"messages.{i}.content: each block needs a type",
             "messages")
    return str(kind)


def _user(blocks: Sequence[Any], i: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        kind = _block_type(block, i)
        if kind == "tool_result":
            results.append(_tool_result(block, i))
        elif kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image(block, i))
        elif kind not in ("thinking", "redacted_thinking"):
            raise errors.BadRequest(f"messages.{i}.content: {kind!r} blocks are not "
                                    "supported by this backend", param="messages")
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        content: Any = "".join(p["text"] for p in parts) if only_text else parts
        results.append({"role": "user", "content": content})
    return results


def _tool_result(block: Mapping[str, Any], i: int) -> dict[str, Any]:
    tool_id = block.get("tool_use_id")
    _require(isinstance(tool_id, str) and bool(tool_id),
             f"messages.{i}.content: tool_result needs a tool_use_id", "messages")
    content = block.get("content")
    if isinstance(content, list):
        text = "".join(str(b.get("text", "")) for b in content
                       if isinstance(b, Mapping) and b.get("type") == "text")
    else:
        text = "" if content is None else str(content)
    if block.get("is_error") is True:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": tool_id, "content": text}


def _image(block: Mapping[str, Any], i: int) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if kind == "base64" and isinstance(source, Mapping):
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif kind == "url" and isinstance(source, Mapping):
        url = str(source.get("url", ""))
    else:
        raise errors.BadRequest(f"messages.{i}.content: an image needs a base64 or url "
                                "source", param="messages")
    return {"type": "image_url", "image_url": {"url": url}}


def _assistant(blocks: Sequence[Any], i: int) -> list[dict[str, Any]]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = _block_type(block, i)
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "tool_use":
            _require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                     f"messages.{i}.content: tool_use needs an id and a name", "messages")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"],
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise errors.BadRequest(f"messages.{i}.content: {kind!r} blocks are not "
                                    "supported in assistant turns", param="messages")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _tools(body: Mapping[str, Any], chat: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools:
        _require(isinstance(tools, list), "tools: a list is required", "tools")
        chat["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind == "tool":
        name = choice.get("name") if isinstance(choice, Mapping) else None
        _require(isinstance(name, str) and bool(name), "tool_choice: a tool name is required",
                 "tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        _require(kind in TOOL_CHOICES, "tool_choice: type must be auto, any, tool or none",
                 "tool_choice")
        chat["tool_choice"] = TOOL_CHOICES[str(kind)]
    if isinstance(choice, Mapping) and choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def _tool(tool: Any, i: int) -> dict[str, Any]:
    _require(isinstance(tool, Mapping) and isinstance(tool.get("name"), str),
             f"tools.{i}: a tool needs a name", "tools")
    kind = tool.get("type", "custom")
    _require(kind == "custom" and "input_schema" in tool,
             f"tools.{i}: only custom tools with an input_schema can be served "
             f"(got {kind!r})", "tools")
    function: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}
