"""``POST /v1/messages``: Anthropic's Messages API behind the same endpoint.

* **Native or translated.** Backends that serve ``/v1/messages`` themselves (task
  ``messages``: vLLM 0.32 does) get the client's body as it is and their answer is passed
  back. When none of the model can, the request is translated to chat completions for
  backends of task ``generate`` (:mod:`controlplane.core.anthropic_request`), and the
  answer — whole or streamed, tool calls included — back to a Message
  (``anthropic_response``, ``anthropic_stream``). One request keeps to one mode.
* **Anthropic's shape for errors**, every one of them on this path — 401, 403, 404, 429,
  503 and a backend's own refusal — ``{"type": "error", "error": {"type", "message"}}``
  with the same HTTP status (``anthropic_errors``); a stream that breaks ends with an
  ``error`` event. Responses carry ``request-id`` (what the SDKs report) beside
  ``x-request-id``.
* **Auth**: ``x-api-key`` (what the Anthropic SDKs send) or ``Authorization: Bearer``.
* **Cache**: as chat, in a scope of its own (:mod:`controlplane.core.anthropic_cache`).
* **``POST /v1/messages/count_tokens``** (the SDKs' ``messages.count_tokens``): the body
  is translated as a Message's (``anthropic_request.to_tokenize``: the same 400s, no
  ``max_tokens``) and counted by an engine's ``/tokenize`` through the ``tokenize`` task's
  routing, limits and fair queue, as ``/tokenize`` itself is: the engine's tokenizer and
  chat template are the only exact count. Only the model's own backends count it, never a
  fallback model's (another tokenizer, another number), and when the model has backends
  that tokenize, their errors are the answer (503 while none is up, the fair queue's
  timeout, an engine's refusal), never a silent switch to another count. Only a model
  with no backend that tokenizes at all is counted by the router
  (:meth:`Router.prompt_tokens`: the model's configured tokenizer, else the approximation,
  of the system prompt and messages: the router reads no tools), which depends on the
  prompt alone. That count is tokenized on the event loop as a generating request's
  prompt is, its time charged to the tenant's share of the loop
  (:mod:`controlplane.core.loop_share`), bounded as theirs by ``http.max_body_bytes``.
  ``x-synapse-count`` says which counted (``engine`` or ``estimate``), on counts only.

Errors the middleware raises itself on these paths (no route, wrong method, a body that
does not decode) are Anthropic's shape too (:mod:`controlplane.api.app`), and so are
those answered below the app (a request aiohttp cannot parse, a refused ``Expect``:
:mod:`controlplane.api.server`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import typedefs, web

from controlplane import errors
from controlplane.api import calls, context, fairness, ops, relay, serving
from controlplane.core import (
    anthropic_cache,
    anthropic_errors,
    anthropic_request,
    anthropic_response,
    anthropic_stream,
    api_calls,
    cache_port,
    cache_rules,
    dispatch,
    sse,
    stream_replay,
)
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from synapse_common import clock as clocks
from synapse_common import tasks, tracing


async def messages(request: web.Request) -> web.StreamResponse:
    return await _anthropic(request, _messages)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await _anthropic(request, _count_tokens)


async def _anthropic(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
    """``handler``'s answer, or its error in Anthropic's shape."""
    ctx = context.get(request)
    try:
        return await handler(request)
    except errors.SynapseError as exc:
        if ctx.headers_sent or isinstance(exc, errors.RequestTimeout):
            raise               # the middleware closes a slow client's connection
        status, body, extra = anthropic_errors.render(exc, ctx.request_id)
        return web.Response(status=status, body=body, content_type="application/json",
                            headers={**ctx.headers(), **extra, **_request_id(ctx)})


COUNT = "x-synapse-count"   # count_tokens: "engine" (its /tokenize) or "estimate" (ours)


def _request_id(ctx: context.RequestContext) -> dict[str, str]:
    return {"request-id": ctx.request_id}


async def _messages(request: web.Request) -> web.StreamResponse:
    chat: dict[str, Any] = {}

    def parse(body: dict[str, Any]) -> api_calls.Call:
        call, translated = api_calls.messages(body)
        chat.update(translated)
        return call

    front = await calls.begin(request, parse, x_api_key=True)
    decision: cache_port.CacheDecision | None = None
    try:
        decision = await serving.lookup_cache(request, front.tenant.name, front.canonical,
                                              "chat", anthropic_cache.cache_body(chat))
        if decision.hit is not None:
            fairness.cache_hit(request, front.tenant.name, front.canonical,
                               decision.hit.response)
            resp = await _from_cache(request, decision.hit.response, front.call.stream)
        else:
            resp = await _from_backend(request, front, chat,
                                       decision if decision.may_store else None)
        front.failed = False
        return resp
    finally:
        calls.finish(request, front, decision)


async def _from_backend(request: web.Request, front: calls.Front, chat: dict[str, Any],
                        store: cache_port.CacheDecision | None) -> web.StreamResponse:
    await calls.admit_tokens(request, front)
    assert front.prompt is not None
    try:
        route = await calls.route(request, front, tasks.MESSAGES)
    except errors.Unavailable:
        route = await calls.route(request, front, tasks.GENERATE)
        started = time.perf_counter()       # a re-encoded body is work on the loop too
        body = calls.body_for(front, route.model, chat)
        context.get(request).work_s += time.perf_counter() - started
        shape: relay.Shape = Translated(request, store, route.model, front.prompt.tokens)
        return await relay.forward(request, route, front.prompt, body,
                                   "/v1/chat/completions", shape)
    return await relay.forward(request, route, front.prompt,
                               calls.body_for(front, route.model), "/v1/messages",
                               Native(request, store))


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    tokenize: dict[str, Any] = {}

    def parse(body: dict[str, Any]) -> api_calls.Call:
        tokenize.update(anthropic_request.to_tokenize(body))
        return api_calls.Call(tasks.TOKENIZE, tokenize["model"], messages=tokenize["messages"],
                              fields=("messages", "max_tokens"), no_cache="tokenize")

    front = await calls.begin(request, parse, x_api_key=True)
    try:
        prompt = await calls.admit_tokens(request, front)
        resp: web.StreamResponse
        if _engine_counts(request, front.canonical):
            route = await _own_route(request, front)
            resp = await relay.forward(request, route, prompt,
                                       calls.body_for(front, route.model, tokenize),
                                       "/tokenize", Counted(request, None))
        else:
            resp = _estimated(request, front)
        front.failed = False
        return resp
    finally:
        calls.finish(request, front)


def _engine_counts(request: web.Request, model: str) -> bool:
    """Whether some backend of ``model`` serves ``tokenize``, up or not: then only an
    engine counts, and while none can the client gets the error rather than a count made
    another way."""
    registry = context.get(request).svc.registry
    return any(b.serves(tasks.TOKENIZE) for b, _ in registry.backends_for(model))


def _no_fallback(model: str) -> bool:
    return False


def _own_plan(request: web.Request, front: calls.Front) -> core_types.RouteDecision:
    """The tokenize route of the model itself (``calls.plan`` without the fallback
    models: their tokenizers count other numbers); 503 when none of its backends can
    take it now."""
    ctx = context.get(request)
    assert front.prompt is not None
    started = time.perf_counter()
    try:
        with tracing.span("route") as span:
            decided = ctx.svc.dispatcher.plan(front.canonical, front.prompt,
                                              front.call.fields, "tokenize",
                                              allows=_no_fallback)
            if span is not None:
                ops.routed(span, decided)
    finally:
        ctx.work_s += time.perf_counter() - started
    return decided.route


async def _own_route(request: web.Request, front: calls.Front) -> core_types.RouteDecision:
    """:func:`_own_plan`, then the fair queue when its backends are saturated."""
    route = _own_plan(request, front)
    if not fairness.queues(request):
        return route
    return await fairness.hold(request, route, lambda: _own_plan(request, front))


def _estimated(request: web.Request, front: calls.Front) -> web.Response:
    """The router's count of the prompt, for a model no backend can tokenize: work on the
    loop, measured into the request's charge as every tokenization is
    (:func:`calls.admit_tokens`), in the tenant's partition of the tokenizers' memo."""
    ctx = context.get(request)
    assert front.call.messages is not None and front.prompt is not None
    started = time.perf_counter()
    prompt = router_mod.Prompt.from_messages(front.call.messages)
    prompt.partition(front.prompt.cache_salt, front.prompt.tenant)
    n = ctx.svc.router.prompt_tokens(prompt, front.canonical)
    ctx.work_s += time.perf_counter() - started
    fairness.answered(request, 200, None)
    ctx.headers_sent = True
    return web.Response(body=orjson.dumps({"input_tokens": n}), content_type="application/json",
                        headers={**ctx.headers(), **_request_id(ctx), COUNT: "estimate"})


async def _from_cache(request: web.Request, answer: Any, stream: bool) -> web.StreamResponse:
    """The hit as a new Message: a fresh id, as every answer gets (``stream_replay.renewed``:
    the ``msg_`` id is made from the chat answer's)."""
    ctx = context.get(request)
    fresh = stream_replay.renewed(answer, int(clocks.wall()), ctx.svc.new_request_id())
    return await calls.from_cache(request, anthropic_response.from_chat(fresh), stream,
                                  anthropic_stream.replay, _request_id(ctx))


class _Anthropic(relay.Shape):
    """Anthropic-shaped refusals and stream errors; stores complete answers."""

    def __init__(self, request: web.Request, store: cache_port.CacheDecision | None) -> None:
        self._request = request
        self._store = store

    def headers(self) -> dict[str, str]:
        return _request_id(context.get(self._request))

    def refusal(self, status: int, data: bytes) -> tuple[bytes, str]:
        refusal = errors.BackendRefusal.from_body(status, data)
        rid = context.get(self._request).request_id
        return orjson.dumps(anthropic_errors.body(refusal, rid)), "application/json"

    def broken(self, message: str) -> bytes:
        return anthropic_errors.sse_event(
            errors.UpstreamError(message, code="stream_interrupted"),
            context.get(self._request).request_id)

    def keep(self, chat_answer: dict[str, Any]) -> None:
        if self._store is not None and cache_rules.is_storable(chat_answer):
            with tracing.span("cache.write"):
                fairness.store(self._request, self._store, chat_answer)


class Native(_Anthropic):
    """The backend's own Messages answer, passed through (whole answers are stored)."""

    def whole(self, data: bytes) -> bytes:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if isinstance(message, dict) and message.get("type") == "message":
            self.keep(anthropic_cache.chat_answer(message))
        return data


class Counted(_Anthropic):
    """The engine's ``/tokenize`` answer as ``count_tokens``'s ``{"input_tokens"}``."""

    def __init__(self, request: web.Request, store: cache_port.CacheDecision | None) -> None:
        super().__init__(request, store)
        self._counted = False

    def start(self, attempt: dispatch.Attempt) -> None:
        self._counted = attempt.status < 400    # a refusal counted nothing

    def headers(self) -> dict[str, str]:
        if not self._counted:
            return super().headers()
        return {**super().headers(), COUNT: "engine"}

    def whole(self, data: bytes) -> bytes:
        try:
            count = orjson.loads(data).get("count")
        except (orjson.JSONDecodeError, AttributeError):
            count = None
        if not isinstance(count, int) or isinstance(count, bool):
            raise errors.UpstreamError("the backend's /tokenize answer has no count")
        return orjson.dumps({"input_tokens": count})


class Translated(_Anthropic):
    """A chat completion (whole or streamed) turned into a Message."""

    def __init__(self, request: web.Request, store: cache_port.CacheDecision | None,
                 model: str, input_tokens: int) -> None:
        super().__init__(request, store)
        self._stream = anthropic_stream.StreamTranslator(
            model, input_tokens, request_id=context.get(request).request_id)
        self._parser = sse.SSEParser() if store is not None else None
        self._assembler = sse.StreamAssembler() if store is not None else None

    def whole(self, data: bytes) -> bytes:
        answer = orjson.loads(data)
        self.keep(answer)
        return orjson.dumps(anthropic_response.from_chat(answer))

    def chunk(self, data: bytes) -> bytes:
        if self._parser is not None and self._assembler is not None:
            for event in self._parser.feed(data):
                self._assembler.add_data(event)
        return self._stream.feed(data)

    def end(self) -> bytes:
        if self._assembler is not None and self._assembler.complete:
            self.keep(dict(self._assembler.response()))
        return self._stream.end()

    def broken(self, message: str) -> bytes:
        return self._stream.interrupted(message)

    def content_type(self, backend_type: str) -> str | None:
        return "text/event-stream"
