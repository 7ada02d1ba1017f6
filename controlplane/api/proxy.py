"""Relaying a backend's answer to the client.

:mod:`controlplane.core.dispatch` chooses the backend, retries before the first byte and
keeps the ledger; this module only turns the attempt it hands over into an aiohttp
response: a whole answer (a backend's 4xx in the OpenAI envelope), or a stream passed
through chunk by chunk as it arrives, ``await resp.write`` giving back-pressure. A large
whole answer holds its share of the whole-answer budget until the client has taken it,
within a bound (:func:`send_whole`). Once the client has received a byte nothing is
retried: a broken stream ends with an SSE error
event and is never cached. Complete answers may be stored in the response cache, off the
hot path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import orjson
from aiohttp import web

from controlplane import errors
from controlplane.adapters import http1
from controlplane.api import context, fairness, readiness
from controlplane.core import cache_port, dispatch, sse
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from controlplane.core import usage as usage_mod
from synapse_common import tracing

log = logging.getLogger("synapse.controlplane.proxy")

_background: set[asyncio.Task[Any]] = set()
# The headers of a backend's answer passed to the client: its body's media type, and
# when to retry (a hosted provider's 429 is relayed, and the OpenAI SDK waits by these),
# as whole seconds or milliseconds only. A backend may be a compromised engine (it runs
# tenants' inputs), and what else it could say reaches the client's SDK or browser:
# cookies, authentication challenges, a Location, CORS and security policies, Alt-Svc, a
# Content-Encoding; the server's own timings (TGI's x-compute-time) tell how long another
# tenant's prefix took. Framing and the rest are aiohttp's, x-request-id and x-synapse-*
# Synapse's own. A value longer than any media type is dropped (aiohttp's default stands).
# Each is looked up by name (the first value of a repeated one, as the dispatcher reads
# the media type) rather than every header of the answer walked.
_PASSED_MAX = 256
_RETRY = (("retry-after", "Retry-After"), ("retry-after-ms", "retry-after-ms"))
_RETRY_DIGITS_MAX = 9


def keep(task: asyncio.Task[Any]) -> None:
    """Hold a fire-and-forget task until it ends (the loop keeps only weak references)."""
    _background.add(task)
    task.add_done_callback(_background.discard)


def _reason_label(reason: str) -> str:
    # Metric label: the first word only ("prefix-hit 87%" → "prefix-hit"), bounded.
    return reason.split(" ", 1)[0].rstrip(",")


async def forward(request: web.Request, route: core_types.RouteDecision,
                  prompt: router_mod.Prompt, body: bytes, path: str, stream: bool,
                  store: cache_port.CacheDecision | None, *, chain: Sequence[str] = (),
                  requested: str = "") -> web.StreamResponse:
    """Relay the first attempt the dispatcher hands over. ``chain`` (the canonical model
    and the fallbacks the tenant may use) lets it fall back at run time; an answer of a
    fallback model says so (``x-synapse-fallback: A->B``) and is never cached."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    http1.charge(budget_key(ctx))
    async with svc.dispatcher.exchange(route, prompt, path, body, ctx.request_id,
                                       chain=chain, requested=requested,
                                       engine_id=ctx.engine_id) as attempt:
        origin = chain[0] if chain else route.model
        if attempt.model != origin:
            ctx.fallback, store = f"{origin}->{attempt.model}", None
        reason = attempt.route.reason
        ctx.backend = attempt.backend.key
        ctx.retries = attempt.index
        ctx.route = reason if attempt.index == 0 else f"{reason}, retry {attempt.index}"
        svc.child(svc.metrics.route_decisions, ctx.backend, _reason_label(reason)).inc()
        up = attempt.answer
        try:
            if stream and up.status == 200 and up.content_type == "text/event-stream":
                return await _stream(request, attempt, store)
            resp = await _whole(request, attempt, store)
        finally:    # the answer's status and usage, for the tenant's tokens and usage
            found = attempt.ticket.usage if attempt.ticket is not None else None
            ctx.usage = fairness.answered(request, attempt.status,
                                          found if isinstance(found, usage_mod.Usage) else None)
    return await send_whole(request, resp) if large(resp) else resp


def large(resp: web.Response) -> bool:
    """Whether a whole answer is large enough to hold the whole-answer budget (as its
    upstream response did): :func:`send_whole` writes it. Small answers are returned for
    the server to write, as before, and never touch the budget."""
    body = resp.body
    return isinstance(body, bytes) and len(body) > http1.HIGH_WATER


def budget_key(ctx: context.RequestContext) -> str:
    """Whose share of the whole-answer budget (:data:`http1.TENANT_SHARE`) a request's
    answers count against: its tenant's; with tenant keys off (``auth.enabled: false``)
    every client is the one tenant ``anonymous``, whose share would be the whole
    deployment's, so each request is its own."""
    return ctx.tenant if ctx.svc.tenants.enabled else ctx.request_id


WRITE_PIECE = 1 << 20     # what send_whole writes, then waits to drain, at a time


async def send_whole(request: web.Request, resp: web.Response) -> web.Response:
    """Write ``resp``, a :func:`large` whole answer, to the client, holding its size of
    the whole-answer budget (:data:`controlplane.adapters.http1.BUDGET`), charged to the
    request's tenant as its upstream response's reservation was, until it is written:
    what aiohttp or the fast lane still holds of an answer for a client that reads
    slowly is memory as the answer read from the backend was. Called once the
    attempt settled, which gave back what its upstream response reserved (with no wait
    between: the reservation passes to the client's answer), so the backend's connection
    and its ledger ticket are released as soon as the answer was read.

    The client's progress is bounded, not the whole write: the body goes out in pieces
    of :data:`WRITE_PIECE`, each awaited until the transport drained it, and each of
    those waits (the head's and the end's too) within ``http.upstream_idle_timeout_s``,
    as a stream's silence is. A client that keeps reading, however slow its link, gets
    the whole answer; one that takes less than a piece within the timeout (reads
    nothing, or trickles) has its connection aborted (dropping what the transport still
    buffers), so no client holds the budget, and the memory, for longer than it keeps
    taking its answer. A client that goes away ends the write too (the handler is
    cancelled, or the write fails)."""
    body = cast(bytes, resp.body)
    held = len(body)
    ctx = request[context.CONTEXT]
    tenant = budget_key(ctx)
    http1.BUDGET.hold(held, tenant)
    idle = ctx.svc.settings.http.upstream_idle_timeout_s
    try:
        async with asyncio.timeout(idle):
            await resp.prepare(request)
        view = memoryview(body)
        for at in range(0, held, WRITE_PIECE):
            async with asyncio.timeout(idle):   # drained: written, and under the mark
                await resp.write(view[at:at + WRITE_PIECE])
        async with asyncio.timeout(idle):
            # The base's end of body: the pieces were the body (Response's own would
            # write it again).
            await web.StreamResponse.write_eof(resp)
    except TimeoutError:
        log.warning("the client did not take its answer within "
                    "http.upstream_idle_timeout_s: connection aborted",
                    extra={"request_id": ctx.request_id})
        ctx.broken = True
        if request.transport is not None:
            request.transport.abort()
    finally:
        http1.BUDGET.give(held, tenant)
    return resp


def _response_headers(attempt: dispatch.Attempt, ctx: context.RequestContext,
                      ) -> dict[str, str]:
    answer = attempt.answer
    headers = {}
    media = answer.header("content-type")
    if media is not None and len(media) <= _PASSED_MAX:
        headers["Content-Type"] = media
    for low, name in _RETRY:
        v = answer.header(low)
        if v is not None and v.isascii() and v.isdigit() and len(v) <= _RETRY_DIGITS_MAX:
            headers[name] = v
    headers.update(ctx.headers())
    return headers


async def _whole(request: web.Request, attempt: dispatch.Attempt,
                 store: cache_port.CacheDecision | None) -> web.Response:
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    data = await attempt.read()
    ctx.first_byte = svc.clock()
    status = attempt.status
    if status >= 400:
        data = orjson.dumps(errors.BackendRefusal.from_body(status, data).envelope())
    elif store is not None:
        _maybe_store(request, store, data)
    ctx.headers_sent = True
    headers = _response_headers(attempt, ctx)
    if status >= 400:
        headers["Content-Type"] = "application/json"
    return web.Response(status=status, body=data, headers=headers)


def _maybe_store(request: web.Request, decision: cache_port.CacheDecision,
                 data: bytes) -> None:
    try:
        response = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if not isinstance(response, dict):
        return
    choices = response.get("choices") or []
    if choices and all(c.get("finish_reason") in sse.CACHEABLE_FINISH for c in choices):
        with tracing.span("cache.write"):
            fairness.store(request, decision, response)    # the cache, via the coalescer


async def _stream(request: web.Request, attempt: dispatch.Attempt,
                  store: cache_port.CacheDecision | None) -> web.StreamResponse:
    ctx = request[context.CONTEXT]
    headers = _response_headers(attempt, ctx)
    headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(status=200, headers=headers)
    parser = sse.SSEParser() if store is not None else None
    strip = fairness.stripper(request)     # usage the client did not ask for
    assembler = sse.StreamAssembler() if store is not None else None
    delivered = fairness.counter(request)  # the estimate, should the engine's usage not come

    async def write(chunk: bytes) -> None:
        out = strip.feed(chunk) if strip is not None else chunk
        if out:
            await resp.write(out)
        if delivered is not None:
            delivered.feed(chunk)
        if parser is not None and assembler is not None:
            for data in parser.feed(chunk):
                assembler.add_data(data)

    if (message := await pump(request, resp, attempt, write)) is not None:
        if strip is not None and (finish := strip.pending()):
            await resp.write(finish)    # the finish chunk it held, before the error event
        return await _broken(request, resp, message)
    if assembler is not None and store is not None and assembler.complete:
        with tracing.span("cache.write"):
            fairness.store(request, store, assembler.response())
    if strip is not None and (rest := strip.rest()):
        await resp.write(rest)
    await resp.write_eof()
    return resp


async def pump(request: web.Request, resp: web.StreamResponse, attempt: dispatch.Attempt,
               write: Callable[[bytes], Awaitable[None]]) -> str | None:
    """Pass the attempt's chunks to ``write`` as they arrive, the response's headers sent
    before the first. None once the backend's stream ended properly; the error's message
    if it broke after the first byte (an error before it raises: nothing sent yet)."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    while True:
        try:
            chunk = await attempt.next_chunk()
            if chunk is None:
                return None
            if not resp.prepared:
                ctx.first_byte = svc.clock()
                ctx.headers_sent = True
                await resp.prepare(request)
            # A client that went away raises here and ends the handler (and the upstream).
            await write(chunk)
        except errors.UpstreamError as exc:
            if not attempt.streaming:
                raise                   # nothing sent yet: an error answer
            return exc.message
        except asyncio.CancelledError:
            # The shutdown grace is over (readiness.cut): a stream begun ends as one the
            # backend broke off, its error event in its route's own shape, then its end.
            if not (resp.prepared and readiness.cut(svc)):
                raise
            if (task := asyncio.current_task()) is not None:
                task.uncancel()
            return readiness.SHUTTING_DOWN


async def cut(request: web.Request, resp: web.StreamResponse, message: str,
              logger: logging.Logger) -> None:
    """Mark the request's stream broken (logged on ``logger``); send the headers if
    nothing was sent yet."""
    ctx = request[context.CONTEXT]
    logger.warning("stream to the client cut: %s", message,
                   extra={"request_id": ctx.request_id, "backend": ctx.backend})
    ctx.broken = True
    if not resp.prepared:
        ctx.headers_sent = True
        await resp.prepare(request)


async def _broken(request: web.Request, resp: web.StreamResponse,
                  message: str) -> web.StreamResponse:
    await cut(request, resp, message, log)
    await resp.write(sse.event(errors.stream_interrupted(message)))
    await resp.write_eof()
    return resp
