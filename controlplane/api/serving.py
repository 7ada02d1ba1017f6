"""The serving path: ``POST /v1/chat/completions`` and ``/v1/completions``.

Order per request: authenticate → rate limit (before a byte of the body is read) → read
and validate the body (parsed once) → resolve the model (alias → canonical, tenant
allow-list) → response cache lookup → token limits and budget
(:mod:`controlplane.api.fairness`) → route (with fallback models) → the fair queue when
the chosen backends are saturated → proxy with retries → (complete answers) cache store
→ settle the tokens and account the usage.

Performance decisions, since this sits in front of every token:

* The client's body bytes are forwarded as they are unless the model name must change
  (alias or fallback); then the parsed body is re-serialised with orjson once. Unknown
  fields therefore reach the backend untouched either way.
* Streams are passed through chunk by chunk as they arrive, ``await resp.write`` giving
  back-pressure; the SSE parser only runs when the answer may be cached.
* Routing with fallbacks, retries and the ledger are :mod:`controlplane.core.dispatch`'s;
  relaying the answer is :mod:`controlplane.api.proxy`'s.
* Client input that Synapse forwards or steers by is checked first: the body's JSON
  nesting depth (``http.max_json_depth``), ``n`` (``http.max_n``), a batch's sequences
  (``http.max_sequences``), structured-output constraints and a forced tool choice's
  schemas (``http.max_structured_output_bytes``), a request's own chat template
  (``http.request_chat_templates``) and multimodal processing overrides
  (``http.request_media_kwargs``), cache transfer parameters (always refused): the rules
  are :mod:`controlplane.core.validation`'s; ``x-session-id`` (printable ASCII), and the
  whole body must arrive within ``http.body_timeout_s`` (408 otherwise).
* No logging per request at info level; metrics are recorded once, by the middleware.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Literal

import orjson
from aiohttp import web

from controlplane import errors
from controlplane.api import context, fairness, fast_lane, ops, proxy
from controlplane.api import services as services_mod
from controlplane.core import (
    cache_port,
    context_length,
    media_urls,
    ratelimit,
    stream_replay,
    tenants,
    validation,
)
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from synapse_common import clock as clocks
from synapse_common import tracing

log = logging.getLogger("synapse.controlplane.serving")

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "embeddings": "/v1/embeddings"}


async def read_body(request: web.Request, limit: int, timeout_s: float,
                    limit_name: str = "http.max_body_bytes") -> bytes:
    """The raw body; 413 when it is over ``limit`` (``limit_name`` says where it is set),
    408 when it does not arrive within ``timeout_s`` (``http.body_timeout_s``)."""
    length = request.content_length     # parsed from the header at each access
    if length is not None and length > limit:
        raise errors.PayloadTooLarge(
            f"the request body is {length} bytes; the limit is {limit} ({limit_name})")
    try:
        if request.content.is_eof():        # it came with the head: no wait to bound
            body = await request.read()
        else:
            async with asyncio.timeout(timeout_s):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(
            f"the request body is over the limit of {limit} bytes ({limit_name})") from None
    except TimeoutError:
        raise errors.RequestTimeout(f"the request body did not arrive within {timeout_s:g}s "
                                    "(http.body_timeout_s)") from None
    if len(body) > limit:   # chunked, so no length to refuse up front: aiohttp's cap is
        raise errors.PayloadTooLarge(   # http.max_body_bytes, a caller's may be smaller
            f"the request body is over the limit of {limit} bytes ({limit_name})")
    return body


async def admit(request: web.Request, parse: Any,
                ) -> tuple[tenants.Tenant, validation.Parsed, bytes, ratelimit.Permit]:
    """Authenticate, rate-limit (:func:`acquire`, before the body), wait for the tenant's
    turn on the loop (:func:`take_turn`), read, parse and validate (a chat's media URLs
    too, as ``calls.begin`` checks them): the common front of every /v1 POST. The permit
    is released if anything after it fails."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    with tracing.span("auth"):
        tenant = svc.tenants.authenticate(request.headers.get("Authorization"))
    ctx.tenant = tenant.name
    permit = await acquire(request, tenant)
    try:
        raw = await turn_then_body(request, svc, ctx)
        h = svc.settings.http
        started = time.perf_counter()
        try:
            parsed: validation.Parsed = parse(validation.parse_json(raw, svc.body_limits))
            # what an engine would fetch (core.media_urls): chat's messages, and those an
            # embeddings body may carry beside its input (vLLM's embeddings take messages)
            media_urls.check_chat(parsed.body.get("messages"), h.media_urls)
        finally:
            charge_now(svc, ctx, time.perf_counter() - started)
    except BaseException:
        release_later(request, permit)
        raise
    return tenant, parsed, raw, permit


async def acquire(request: web.Request, tenant: tenants.Tenant) -> ratelimit.Permit:
    """A slot under the tenant's request rate and concurrency, taken before a byte of the
    body is read or parsed (429 naming the limit): a tenant over its rate costs no body
    read or parse, and a body that is refused (400, 413, 408) still counts against it.
    The fast lane drops the body of a tenant the limiter refuses at the head
    (``fast_lane.BODY_DROPPED``, ``ratelimit.RateLimiter.peek``): such a request is a
    429 even if a token or a slot came since, and takes neither."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    try:
        if request.get(fast_lane.BODY_DROPPED):     # refused at its head, body unread
            verdict = svc.limiter.peek(tenant)
            raise svc.limiter.refusal(tenant, verdict if not verdict.allowed
                                      else ratelimit.Verdict(False, 0.0, "rate"))
        return await svc.limiter.acquire(tenant, ctx.request_id)
    except errors.RateLimited as exc:
        svc.child(svc.metrics.rate_limited, tenant.name, exc.limit).inc()
        raise


async def turn_then_body(request: web.Request, svc: services_mod.Services,
                         ctx: context.RequestContext) -> bytes:
    """Wait for the tenant's turn on the loop, then read the body. When the body was still
    arriving, the tenant's other requests may have been parsed (and charged) meanwhile:
    the turn is taken again, so the caller's parse, which follows with no await, comes
    after a check that saw every parse before it (``core.loop_share``)."""
    # rarely anything but 0.0 (no wait; None refuses): no coroutine on the hot path
    if (wait := svc.loop_share.wait_s(ctx.tenant)) != 0.0:
        await take_turn(svc, ctx, wait)
    h = svc.settings.http
    arriving = not request.content.is_eof()
    raw = await read_body(request, h.max_body_bytes, h.body_timeout_s)
    if arriving and (wait := svc.loop_share.wait_s(ctx.tenant)) != 0.0:
        await take_turn(svc, ctx, wait)
    return raw


def charge_now(svc: services_mod.Services, ctx: context.RequestContext,
               seconds: float) -> None:
    """Charge ``seconds`` of the request's work (its parse) to its tenant's loop share at
    once rather than when the request ends: the tenant's next request, which may start
    while this one waits for its backend, must see it."""
    svc.loop_share.charge(ctx.tenant, seconds)


async def take_turn(svc: services_mod.Services, ctx: context.RequestContext,
                    wait: float | None) -> None:
    """Wait until the tenant's turn on the event loop comes (only a tenant whose requests
    cost the loop much waits), asking again after each wait, since the tenant's other
    requests that waited alongside may have gone first; 429 when its turn is too far off.
    ``wait``: what :meth:`~core.loop_share.LoopShare.wait_s` has just answered for it."""
    share = svc.loop_share
    while wait:
        svc.child(svc.metrics.loop_share_wait, ctx.tenant).inc(wait)
        try:
            await asyncio.sleep(wait)
        finally:
            share.waited(ctx.tenant)
        wait = share.wait_s(ctx.tenant)
    if wait is None:
        svc.child(svc.metrics.rate_limited, ctx.tenant, "loop_share").inc()
        raise errors.RateLimited(
            "this tenant's requests are using more than its share of the control plane's "
            "CPU; slow down",
            retry_after_s=share.max_wait_s, limit="loop_share")


def resolve_model(request: web.Request, tenant: tenants.Tenant, name: str) -> str:
    """The canonical model for ``name``; 404 when unknown or not allowed to the tenant.

    The same 404 for both: a different answer for a model the tenant may not use would
    tell it which model names other tenants have (``/v1/models`` lists only its own)."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    ctx.model_asked = name
    canonical = svc.catalog.canonical(name)
    known = svc.catalog.is_configured(name) or canonical in svc.registry.served_models()
    if not known or not tenant.allows(canonical):
        raise errors.NotFound(
            f"the model {name!r} does not exist; GET /v1/models lists the models you can use",
            param="model")
    ctx.model = canonical
    return canonical


def release_later(request: web.Request, permit: ratelimit.Permit) -> None:
    """Release a rate-limit slot without awaiting (safe inside a cancelled handler)."""
    if permit.store is None:
        return
    svc = request[context.CONTEXT].svc
    task = asyncio.get_running_loop().create_task(svc.limiter.release(permit))
    proxy.keep(task)


def prompt_of(parsed: validation.Parsed, session: str, exact: bool) -> router_mod.Prompt:
    """The prompt the router and the token limits see, with the fewest tokens it can be
    (``core.context_length``), which routing holds against the backends' contexts."""
    if parsed.endpoint == "chat":
        messages = parsed.body["messages"]
        prompt = router_mod.Prompt.from_messages(messages, parsed.max_tokens, session, exact)
        prompt.floor(context_length.of_chat_body, parsed.body, messages)
        return prompt
    prompt = router_mod.Prompt.from_text(parsed.prompt_text, parsed.max_tokens, session, exact)
    prompt.floor(context_length.of_completion_body, parsed.body)
    return prompt


def choose(request: web.Request, canonical: str, prompt: router_mod.Prompt,
           parsed: validation.Parsed, tenant: tenants.Tenant | None = None,
           ) -> core_types.RouteDecision:
    """Route ``canonical``, else the fallbacks ``tenant`` may use, in order
    (``core.dispatch``'s plan)."""
    svc = request[context.CONTEXT].svc
    with tracing.span("route") as span:
        plan = svc.dispatcher.plan(canonical, prompt, validation.size_fields(parsed),
                                   allows=tenant.allows if tenant is not None else None)
        if span is not None:
            ops.routed(span, plan)
    return plan.route


def body_for(raw: bytes, parsed: validation.Parsed, model: str) -> bytes:
    """The bytes to send upstream: the client's own unless the model name changes."""
    if parsed.body.get("model") == model:
        return raw
    return orjson.dumps({**parsed.body, "model": model})


async def lookup_cache(request: web.Request, tenant: str, canonical: str,
                       kind: Literal["chat", "completions"], body: Any) -> cache_port.CacheDecision:
    """The response cache's decision for this request, traced as ``cache.lookup``; the
    status goes to the request's context (access log, headers), the lookup's own work on
    the body (its keys) to the request's loop-share charge."""
    ctx = request[context.CONTEXT]
    with tracing.span("cache.lookup") as span:
        decision = await fairness.lookup(request, cache_port.CacheRequest(
            tenant, canonical, kind, body, request.headers.get("Cache-Control", ""),
            ctx.request_id))
        if span is not None:
            span.set_attribute("synapse.cache", decision.status)
    ctx.cache = decision.status
    ctx.work_s += decision.work_s
    return decision


async def generate(request: web.Request, endpoint: validation.Endpoint) -> web.StreamResponse:
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    parse = validation.chat if endpoint == "chat" else validation.completions
    tenant, parsed, raw, permit = await admit(request, parse)
    decision: cache_port.CacheDecision | None = None
    failed = True
    try:
        canonical = resolve_model(request, tenant, parsed.model)
        decision = await lookup_cache(request, tenant.name, canonical,
                                      "chat" if endpoint == "chat" else "completions",
                                      parsed.body)
        if decision.hit is not None:
            fairness.cache_hit(request, tenant.name, canonical, decision.hit.response)
            resp = await answer_from_cache(request, decision.hit, parsed)
            failed = False
            return resp
        session = router_mod.session_key(   # per tenant: ids are the tenants' own
            tenant.name, validation.session_id(request.headers.get("x-session-id"))
            or parsed.user)
        started = time.perf_counter()
        prompt = prompt_of(parsed, session, svc.router.exact_prompts)
        prompt.streams = parsed.stream
        prompt.sequences = parsed.sequences
        prompt.partition(svc.salt_for(tenant.name, parsed.body.get("cache_salt")), tenant.name)
        prompt.tokenize()       # here, where its time is measured
        ctx.work_s += time.perf_counter() - started
        await fairness.admit(request, tenant.name, canonical, prompt, parsed.max_tokens,
                             parsed.sequences)
        started = time.perf_counter()
        try:
            route = choose(request, canonical, prompt, parsed, tenant)
        finally:
            ctx.work_s += time.perf_counter() - started
        if fairness.queues(request):
            route = await fairness.hold(
                request, route, lambda: choose(request, canonical, prompt, parsed, tenant))
        started = time.perf_counter()       # a re-encoded body is work on the loop too
        body = fairness.upstream_body(request, parsed.body, route.model,
                                      body_for(raw, parsed, route.model))
        ctx.work_s += time.perf_counter() - started
        resp = await proxy.forward(request, route, prompt, body, PATHS[endpoint],
                                   parsed.stream, decision if decision.may_store else None,
                                   chain=svc.dispatcher.chain(canonical, tenant.allows),
                                   requested=parsed.model)
        failed = False
        return resp
    finally:
        fairness.finish(request, decision, failed)
        release_later(request, permit)


async def answer_from_cache(request: web.Request, hit: cache_port.CacheHit,
                            parsed: validation.Parsed) -> web.StreamResponse:
    """The hit as a new answer (a fresh id and ``created``: ``stream_replay.renewed``),
    whole or replayed as a stream."""
    ctx = request[context.CONTEXT]
    hit = dataclasses.replace(hit, response=stream_replay.renewed(
        hit.response, int(clocks.wall()), ctx.svc.new_request_id()))
    headers = ctx.headers()
    if hit.similarity is not None:
        headers["x-synapse-cache-similarity"] = f"{hit.similarity:.4f}"
    if hit.score is not None:
        headers["x-synapse-cache-score"] = f"{hit.score:.4f}"
    ctx.headers_sent = True
    if not parsed.stream:
        return web.Response(body=orjson.dumps(dict(hit.response)), headers=headers,
                            content_type="application/json")
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    ctx.first_byte = ctx.svc.clock()
    for chunk in hit.events(parsed.body):   # shaped like a live stream (usage if asked)
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, "completions")
