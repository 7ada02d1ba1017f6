"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic Messages, as vLLM
0.32 serves them natively (it registers them beside chat for every generating model).

Shapes from a real vLLM 0.32.0: the message id is the chat id (``chatcmpl-<16 hex>``),
``stop_sequence`` is left out when there is none, ``usage`` carries ``input_tokens`` and
``output_tokens`` only. A stream is ``message_start`` (usage with the input tokens),
per block ``content_block_start`` / ``content_block_delta`` (``text_delta`` or
``input_json_delta``) / ``content_block_stop``, then ``message_delta`` (``stop_reason``,
``stop_sequence``, usage) and ``message_stop``; vLLM sends no ``ping``. Errors are
``{"type": "error", "error": {"type", "message"}}`` with vLLM's type names
(``NotFoundError``, ``BadRequestError``), rendered by the app's middleware.

Stop reasons: the length cap → ``max_tokens``; a stop sequence → ``stop_sequence`` (and
the string); a tool call (``toolcalls``) → ``tool_use``; otherwise ``end_turn``.
The request is read the way vLLM converts it to chat: ``system`` (a string or text
blocks) first, text blocks joined, a ``tool_use`` block as its JSON input, a
``tool_result`` block as a ``tool`` message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from simulator import answer as ans
from simulator import errors, faults, protocol, toolcalls


class MessagesApi:
    def __init__(self, answers: ans.Answers, served: list[str],
                 fault_state: faults.Faults) -> None:
        self.answers = answers
        self.served = served
        self.faults = fault_state

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self.create),
                web.post("/v1/messages/count_tokens", self.count_tokens)]

    def _model(self, body: Mapping[str, Any]) -> str:
        model = protocol.model_name(body)
        if model is None:
            raise errors.BadRequest("model: Field required", param="model")
        protocol.check_served(model, self.served)
        return model

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        self._model(body)
        n = len(self.answers.chat_tokens.chat(chat_messages(body)))
        return _json({"input_tokens": n, "context_management": {"original_input_tokens": n}})

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = protocol.parse_body(await request.read())
        model = self._model(body)
        max_tokens = protocol.integer(body, "max_tokens", 1)
        if max_tokens is None:
            raise errors.BadRequest("max_tokens: Field required", param="max_tokens")
        for name in ("temperature", "top_p", "top_k"):
            protocol.number(body, name)
        stop = body.get("stop_sequences") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise errors.BadRequest("stop_sequences must be a list of strings.",
                                    param="stop_sequences")
        tools, choice = toolcalls.anthropic_tools(body)
        ask = ans.Ask(chat_messages(body), max_tokens, stop, None, tools, choice,
                      cache_salt=protocol.cache_salt(body))
        stream = protocol.boolean(body, "stream")
        mid = "chatcmpl-" + ans.new_id()
        answer = await self.answers.start(ask, mid, stream)
        try:
            if stream:
                return await self._stream(request, answer, mid, model)
            await answer.wait(request)
        finally:
            self.answers.release(answer)
        return _json(full_message(answer, mid, model))

    async def _stream(self, request: web.Request, answer: ans.Answer, mid: str,
                      model: str) -> web.StreamResponse:
        writer = ans.EventWriter(request, self.faults)
        await writer.open()
        start: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "content": [],
                 "model": model, "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 0}}
        await writer.send("message_start", {"type": "message_start", "message": start})
        call = answer.call
        block: dict[str, Any] = {"type": "text", "text": ""} if call is None else {
            "type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        await writer.send("content_block_start", {"type": "content_block_start",
                                                  "content_block": block, "index": 0})
        async for piece in answer.stream(request):
            delta = ({"type": "text_delta", "text": piece} if call is None
                     else {"type": "input_json_delta", "partial_json": piece})
            await writer.send("content_block_delta", {"type": "content_block_delta",
                                                      "delta": delta, "index": 0})
        await writer.send("content_block_stop", {"type": "content_block_stop", "index": 0})
        reason, sequence = stop_reason(answer)
        await writer.send("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"input_tokens": answer.prompt_tokens,
                      "output_tokens": answer.out.num_tokens}})
        await writer.send("message_stop", {"type": "message_stop"})
        return await writer.close()


def stop_reason(answer: ans.Answer) -> tuple[str, str | None]:
    if answer.call is not None:
        return "tool_use", None
    if answer.out.finish_reason == "length":
        return "max_tokens", None
    if answer.out.stop_reason is not None:
        return "stop_sequence", answer.out.stop_reason
    return "end_turn", None


def full_message(answer: ans.Answer, mid: str, model: str) -> dict[str, Any]:
    call = answer.call
    content: list[dict[str, Any]] = [{"type": "text", "text": answer.out.text}] if call is None \
        else [{"type": "tool_use", "id": call.id, "name": call.name,
               "input": call.input}]
    reason, sequence = stop_reason(answer)
    out: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant",
                           "content": content, "model": model, "stop_reason": reason}
    if sequence is not None:
        out["stop_sequence"] = sequence
    out["usage"] = {"input_tokens": answer.prompt_tokens, "output_tokens": answer.out.num_tokens}
    return out


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``system`` and ``messages`` as chat messages with plain-text content."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": protocol.text_of(system)})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.BadRequest("messages must be a non-empty list.", param="messages")
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            raise errors.BadRequest("each message needs a role of 'user' or 'assistant'.",
                                    param="messages")
        out.extend(_blocks(str(message["role"]), message.get("content")))
    return out


def _blocks(role: str, content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise errors.BadRequest("content must be a string or a list of blocks.",
                                param="messages")
    text: list[str] = []
    out: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "tool_use":
            text.append(orjson.dumps(block.get("input", {})).decode())
        elif kind == "tool_result":
            out.append({"role": "tool", "content": protocol.text_of(block.get("content"))})
        elif kind is None:
            raise errors.BadRequest("each content block needs a type.", param="messages")
    if text:
        out.insert(0, {"role": role, "content": "".join(text)})
    return out


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")
