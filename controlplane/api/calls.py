"""The common front and middle of every path beyond chat and completions.

The order is the chat path's (:mod:`controlplane.api.serving`), so each path gets the same
rules: authenticate → rate limit (before a byte of the body) → read the body
(``http.max_body_bytes``, ``http.body_timeout_s``) and parse it once
(``http.max_json_depth``) → resolve the model (404
unknown, **403 when the tenant may not use it**) → [the response cache, where the path
allows it] → token limits and budget → route to backends that serve the path's task
(with fallback models; 503 when none can) → the fair queue → dispatch with retries
before the first byte → settle the tokens and account the usage when the request ends.

``x-api-key`` is accepted in place of ``Authorization: Bearer`` where a client family
sends it (the Anthropic SDKs, on ``/v1/messages``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from controlplane import errors
from controlplane.api import context, fairness, ops, serving
from controlplane.core import (
    api_calls,
    context_length,
    media_urls,
    ratelimit,
    tenants,
    validation,
)
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from synapse_common import tasks, tracing

Parse = Callable[[dict[str, Any]], api_calls.Call]


@dataclasses.dataclass
class Front:
    tenant: tenants.Tenant
    body: dict[str, Any]
    raw: bytes
    call: api_calls.Call
    permit: ratelimit.Permit
    canonical: str = ""
    prompt: router_mod.Prompt | None = None
    failed: bool = True             # cleared when the handler returns an answer


def authorization(request: web.Request, x_api_key: bool) -> str | None:
    header = request.headers.get("Authorization")
    if header is None and x_api_key and (key := request.headers.get("x-api-key")):
        return f"Bearer {key}"
    return header


async def continue_if_known(request: web.Request) -> None:
    """The routes' ``Expect`` handler: ``100 Continue`` only for a request that carries a
    valid tenant key (``Authorization`` or ``x-api-key``) of a tenant not over its rate or
    concurrency (``RateLimiter.peek``), so a client without one, or over its limits, is
    not invited to send its body: the handler answers it (401, 403 for the admin key,
    429) before any of it, as on the fast lane. Whether the key fits the route is still the
    handler's to say. Any other expectation is aiohttp's 417, which
    :mod:`controlplane.api.server` answers in the path's error shape, as it does aiohttp's
    own for no route (aiohttp calls this before the middleware: no request id or metrics
    for that one)."""
    svc = request.app[context.SERVICES]
    try:
        tenant = svc.tenants.authenticate(authorization(request, x_api_key=True))
    except errors.SynapseError:
        return None
    if not svc.limiter.peek(tenant).allowed:
        return None     # over its rate or concurrency: its 429 comes before its body
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed()
    if request.version == (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0      # the answer proper has not begun
    return None


def authenticate(request: web.Request, x_api_key: bool = False) -> tenants.Tenant:
    svc, ctx = context.of(request)
    with tracing.span("auth"):
        tenant = svc.tenants.authenticate(authorization(request, x_api_key))
    ctx.tenant = tenant.name
    return tenant


async def begin(request: web.Request, parse: Parse, *, x_api_key: bool = False,
                turns: tuple[str, ...] = validation.TURNS) -> Front:
    """Authenticate, rate-limit (``serving.acquire``: before the body), wait for the
    tenant's turn on the loop (``serving.take_turn``), read and parse the body (its
    arrays of ``turns`` bounded by ``http.max_messages``), resolve the model."""
    tenant = authenticate(request, x_api_key)
    permit = await serving.acquire(request, tenant)     # before a byte of the body
    try:
        front = Front(tenant, *await _read(request, parse, turns), permit)
        front.canonical = serving.resolve_model(request, tenant, front.call.model)
    except BaseException:
        serving.release_later(request, permit)
        raise
    return front


async def _read(request: web.Request, parse: Parse, turns: tuple[str, ...],
                ) -> tuple[dict[str, Any], bytes, api_calls.Call]:
    """Wait for the tenant's turn, read, parse and check the body: (body, raw, call)."""
    svc, ctx = context.of(request)
    raw = await serving.turn_then_body(request, svc, ctx)
    h = svc.settings.http
    started = time.perf_counter()
    try:
        body = validation.parse_json(raw, svc.body_limits, turns)
        call = parse(body)
        validation.bound_sequences(call.sequences, 1, h.max_pooling_inputs, call.fields[0],
                                   "inputs", "http.max_pooling_inputs")
        api_calls.bound_input_bytes(call.task, body, h.max_pooling_input_bytes)
        # what an engine would fetch (core.media_urls): chat-shaped messages (Anthropic's
        # images translated), and the body as sent, which passes to the engine as it is
        media_urls.check_chat(call.messages, h.media_urls)
        media_urls.check_body(body, h.media_urls)
    finally:
        serving.charge_now(svc, ctx, time.perf_counter() - started)
    return body, raw, call


def prompt_of(request: web.Request, tenant: str, call: api_calls.Call) -> router_mod.Prompt:
    """The prompt the router and the token limits see (``exact``: tokenized and put in
    the prefix index — only for paths that generate from it); its session is
    ``tenant``'s (:func:`router.session_key`)."""
    svc = context.get(request).svc
    session = router_mod.session_key(
        tenant, validation.session_id(request.headers.get("x-session-id")) or call.user)
    exact = call.exact and svc.router.exact_prompts
    if call.messages is not None:
        return router_mod.Prompt.from_messages(call.messages, call.max_tokens, session, exact)
    return router_mod.Prompt.from_text(call.text, call.max_tokens, session, exact)


async def admit_tokens(request: web.Request, front: Front) -> router_mod.Prompt:
    """The token limits and budget (429 naming the limit); the prompt for routing."""
    ctx = request[context.CONTEXT]
    started = time.perf_counter()
    prompt = front.prompt = prompt_of(request, front.tenant.name, front.call)
    prompt.sequences = front.call.sequences     # the seats it takes (a rerank's documents)
    if front.call.task in tasks.GENERATING and front.call.messages is not None:
        # held against the backends' contexts when routed (core.context_length)
        prompt.floor(context_length.of_chat_body, front.body, front.call.messages)
    # The engines' prefix cache, per tenant: pooling calls too (vLLM caches the prefixes
    # of decoder embedding and scoring models, and takes cache_salt on every pooling API).
    prompt.partition(ctx.svc.salt_for(front.tenant.name, front.body.get("cache_salt")),
                     front.tenant.name)
    prompt.tokenize()       # here, where its time is measured (core.loop_share)
    ctx.work_s += time.perf_counter() - started
    # Paths that generate nothing are charged their input only (settled from usage).
    max_tokens = front.call.max_tokens or (0 if front.call.task in tasks.GENERATING else 1)
    await fairness.admit(request, front.tenant.name, front.canonical, prompt, max_tokens)
    return prompt


def plan(request: web.Request, front: Front, task: str) -> core_types.RouteDecision:
    """Backends of ``task`` for the model, else its fallbacks (503 when none can serve)."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    assert front.prompt is not None
    started = time.perf_counter()
    try:
        with tracing.span("route") as span:
            decided = svc.dispatcher.plan(front.canonical, front.prompt, front.call.fields,
                                          task,  # type: ignore[arg-type]
                                          allows=front.tenant.allows)
            if span is not None:
                ops.routed(span, decided)
    finally:
        ctx.work_s += time.perf_counter() - started
    if decided.fallback:
        context.get(request).fallback = decided.fallback
    return decided.route


async def route(request: web.Request, front: Front, task: str) -> core_types.RouteDecision:
    """:func:`plan`, then the fair queue when the chosen backends are saturated."""
    decided = plan(request, front, task)
    if not fairness.queues(request):
        return decided
    return await fairness.hold(request, decided, lambda: plan(request, front, task))


def body_for(front: Front, model: str, body: Mapping[str, Any] | None = None) -> bytes:
    """The bytes to send upstream: the client's own unless the model name changes (or
    ``body`` replaces the client's, e.g. a translation)."""
    if body is not None:
        return orjson.dumps({**body, "model": model})
    if front.body.get("model") == model:
        return front.raw
    return orjson.dumps({**front.body, "model": model})


def finish(request: web.Request, front: Front, decision: Any = None) -> None:
    """The request ended (however): tokens settled, usage accounted, slot released."""
    fairness.finish(request, decision, front.failed)
    serving.release_later(request, front.permit)


async def from_cache(request: web.Request, answer: Mapping[str, Any], stream: bool,
                     replay: Callable[[Any], bytes],
                     headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """A cached answer, whole or replayed as its API's event stream (``replay``)."""
    ctx = context.get(request)
    headers = {**ctx.headers(), **(headers or {})}
    ctx.headers_sent = True
    if not stream:
        return web.Response(body=orjson.dumps(answer), headers=headers,
                            content_type="application/json")
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    ctx.first_byte = ctx.svc.clock()
    await resp.write(replay(answer))
    await resp.write_eof()
    return resp
