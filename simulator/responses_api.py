"""``POST /v1/responses`` and ``GET /v1/responses/{id}`` as vLLM 0.32 serves them.

Shapes were taken from a real vLLM 0.32.0 (CPU build, SmolLM2): the response object
echoes the request's settings (``temperature``, ``tool_choice`` — ``"none"`` without
tools —, ``max_output_tokens``, ``truncation`` …) plus vLLM's extra fields
(``kv_transfer_params``, ``input_messages`` …); ids are ``resp_<16 hex>`` and
``msg_<16 hex>``; ``status`` is ``incomplete`` with ``incomplete_details.reason
"max_output_tokens"`` when the length cap ended the answer. A stream is SSE with named
events and a ``sequence_number`` on each, and no ``[DONE]``:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` per token,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed`` (the whole response). A tool call
(``toolcalls``) is a ``function_call`` item streamed with
``response.function_call_arguments.delta`` / ``.done``.

State: like vLLM, answers are kept only when the store is enabled (vLLM's
``VLLM_ENABLE_RESPONSES_API_STORE``, here ``--responses-store``), in this process's
memory (the newest :data:`STORE_LIMIT`). Without it — vLLM's default — a
``previous_response_id`` or ``GET /v1/responses/{id}`` is answered 404 ``Response with id
'…' not found.``. So a conversation continued by id must come back to the same engine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from simulator import answer as ans
from simulator import errors, faults, protocol, toolcalls
from synapse_common import responses_input

STORE_LIMIT = 1000
class ResponsesApi:
    def __init__(self, answers: ans.Answers, served: list[str], fault_state: faults.Faults,
                 wall: Callable[[], float], store: bool) -> None:
        self.answers = answers
        self.served = served
        self.faults = fault_state
        self.wall = wall
        self.store: OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] | None = (
            OrderedDict() if store else None)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/responses", self.create),
                web.get("/v1/responses/{response_id}", self.retrieve)]

    async def retrieve(self, request: web.Request) -> web.Response:
        rid = request.match_info["response_id"]
        _, body = self._stored(rid)
        return _json(body)

    def _stored(self, rid: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        found = self.store.get(rid) if self.store is not None else None
        if found is None:
            raise errors.ResponseNotFound(rid)
        return found

    def _model(self, body: Mapping[str, Any]) -> str:
        return protocol.served_model(protocol.model_name(body), self.served)

    def _ask(self, body: Mapping[str, Any]) -> tuple[ans.Ask, list[dict[str, Any]]]:
        history: list[dict[str, Any]] = []
        prev = body.get("previous_response_id")
        if prev is not None:
            history = list(self._stored(str(prev))[0])
        messages = history + input_messages(body)
        tools, choice = toolcalls.responses_tools(body)
        for name in ("temperature", "top_p"):
            protocol.number(body, name)
        seed = body.get("seed")
        ask = ans.Ask(messages, protocol.integer(body, "max_output_tokens", 1),
                      protocol.stop_list(body), seed if isinstance(seed, int) else None,
                      tools, choice, ignore_eos=protocol.boolean(body, "ignore_eos"),
                      where="input", cache_salt=protocol.cache_salt(body))
        return ask, messages

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = protocol.parse_body(await request.read())
        model = self._model(body)
        ask, messages = self._ask(body)
        stream = protocol.boolean(body, "stream")
        rid = "resp_" + ans.new_id()
        answer = await self.answers.start(ask, rid, stream)
        view = View(body, model, rid, int(self.wall()), answer, ask)
        try:
            if stream:
                return await self._stream(request, view)
            await answer.wait(request)
        finally:
            self.answers.release(answer)
        out = view.response("completed")
        self._keep(body, rid, messages, view, out)
        return _json(out)

    def _keep(self, body: Mapping[str, Any], rid: str, messages: list[dict[str, Any]],
              view: View, out: dict[str, Any]) -> None:
        if self.store is None or body.get("store") is False:
            return
        self.store[rid] = ([*messages, view.as_message()], out)
        while len(self.store) > STORE_LIMIT:
            self.store.popitem(last=False)

    async def _stream(self, request: web.Request, view: View) -> web.StreamResponse:
        writer = ans.EventWriter(request, self.faults)
        await writer.open()
        seq = Sequencer(writer)
        start = view.response("in_progress", final=False)
        await seq.send("response.created", {"response": start})
        await seq.send("response.in_progress", {"response": start})
        item = view.item(final=False)
        await seq.send("response.output_item.added", {"item": item, "output_index": 0})
        if view.answer.call is None:
            await self._stream_text(request, view, seq, item["id"])
        else:
            await self._stream_call(request, view, seq, item["id"])
        await seq.send("response.output_item.done", {"item": view.item(), "output_index": 0})
        out = view.response("completed")
        await seq.send("response.completed", {"response": out})
        self._keep(view.body, view.rid, view.ask.messages, view, out)
        return await writer.close()

    async def _stream_text(self, request: web.Request, view: View, seq: Sequencer,
                           item_id: str) -> None:
        where = {"content_index": 0, "item_id": item_id, "output_index": 0}
        part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
        await seq.send("response.content_part.added", {**where, "part": part})
        async for piece in view.answer.stream(request):
            await seq.send("response.output_text.delta",
                           {**where, "delta": piece, "logprobs": []})
        text = view.answer.out.text
        await seq.send("response.output_text.done", {**where, "logprobs": [], "text": text})
        await seq.send("response.content_part.done",
                       {**where, "part": {**part, "text": text, "logprobs": None}})

    async def _stream_call(self, request: web.Request, view: View, seq: Sequencer,
                           item_id: str) -> None:
        where = {"item_id": item_id, "output_index": 0}
        async for piece in view.answer.stream(request):
            await seq.send("response.function_call_arguments.delta", {**where, "delta": piece})
        assert view.answer.call is not None
        await seq.send("response.function_call_arguments.done",
                       {**where, "arguments": view.answer.call.arguments,
                        "name": view.answer.call.name})


class Sequencer:
    """Numbers the events of one stream (``sequence_number`` from 0) and names them."""

    def __init__(self, writer: ans.EventWriter) -> None:
        self.writer = writer
        self.number = 0

    async def send(self, name: str, payload: Mapping[str, Any]) -> None:
        await self.writer.send(name, {**payload, "sequence_number": self.number, "type": name})
        self.number += 1


class View:
    """Renders one answer as Responses objects."""

    def __init__(self, body: Mapping[str, Any], model: str, rid: str, created: int,
                 answer: ans.Answer, ask: ans.Ask) -> None:
        self.body = body
        self.model = model
        self.rid = rid
        self.created = created
        self.answer = answer
        self.ask = ask
        self.item_id = ("fc_" if answer.call is not None else "msg_") + ans.new_id()

    def item(self, final: bool = True) -> dict[str, Any]:
        call = self.answer.call
        if call is not None:
            return {"arguments": call.arguments if final else "", "call_id": call.id,
                    "name": call.name, "type": "function_call", "id": self.item_id,
                    "async": None, "caller": None, "namespace": None,
                    "status": "completed" if final else "in_progress"}
        text = self.answer.out.text
        content: list[dict[str, Any]] = [
            {"annotations": [], "text": text, "type": "output_text", "logprobs": None}]
        return {"id": self.item_id, "content": content if final and text else [],
                "role": "assistant", "status": "completed" if final else "in_progress",
                "type": "message", "phase": None}

    def as_message(self) -> dict[str, Any]:
        call = self.answer.call
        text = call.arguments if call is not None else self.answer.out.text
        return {"role": "assistant", "content": text}

    def usage(self) -> dict[str, Any]:
        a = self.answer
        return {"input_tokens": a.prompt_tokens,
                "input_tokens_details": {"cached_tokens": a.cached_tokens,
                                         "cache_write_tokens": 0, "input_tokens_per_turn": [],
                                         "cached_tokens_per_turn": []},
                "output_tokens": a.out.num_tokens,
                "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                          "output_tokens_per_turn": [],
                                          "tool_output_tokens_per_turn": []},
                "total_tokens": a.prompt_tokens + a.out.num_tokens}

    def response(self, status: str, final: bool = True) -> dict[str, Any]:
        b = self.body
        if final and self.answer.finish_reason == "length":
            status = "incomplete"
        tools = b.get("tools") or []
        return {
            "id": self.rid, "created_at": self.created,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "instructions": b.get("instructions"), "metadata": b.get("metadata"),
            "model": self.model, "object": "response",
            "output": [self.item()] if final else [],
            "parallel_tool_calls": b.get("parallel_tool_calls", True) is not False,
            "temperature": _number_or(b.get("temperature"), 1.0),
            "tool_choice": b.get("tool_choice", "auto") if tools else "none", "tools": tools,
            "top_p": _number_or(b.get("top_p"), 1.0), "background": False,
            "max_output_tokens": self.ask.max_tokens or self.answer.seq.output_len,
            "max_tool_calls": b.get("max_tool_calls"),
            "previous_response_id": b.get("previous_response_id"), "prompt": None,
            "reasoning": b.get("reasoning"), "service_tier": b.get("service_tier", "auto"),
            "status": status, "text": b.get("text"), "top_logprobs": None,
            "truncation": b.get("truncation", "disabled"),
            "usage": self.usage() if final else None, "user": b.get("user"),
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": None,
            "ec_transfer_params": None, "input_messages": None, "output_messages": None}


def input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` (a string or a list of items) as chat messages."""
    out = responses_input.instructions(body)
    value = body.get("input")
    if isinstance(value, str):
        return [*out, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise errors.BadRequest("input must be a string or a non-empty list of items.",
                                param="input")
    for item in value:
        message = _item_message(item)
        if message is not None:
            out.append(message)
    return out


def _item_message(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, Mapping):
        raise errors.BadRequest("each input item must be an object.", param="input")
    kind = item.get("type", "message")
    if kind == "message" or "role" in item:
        role = responses_input.ROLES.get(str(item.get("role")))
        if role is None:
            raise errors.BadRequest(f"unknown role {item.get('role')!r} in input.",
                                    param="input")
        return {"role": role, "content": protocol.text_of(item.get("content"))}
    if kind == "reasoning":
        return None
    turn = responses_input.function_turn(item)
    if turn is None:
        raise errors.BadRequest(f"input items of type {kind!r} are not supported.",
                                param="input")
    return turn


def _number_or(value: Any, default: float) -> float:
    return default if value is None else float(value)


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")
