"""Proxying one request to the routed candidates, with retries before the first byte.

``forward`` walks the ordered candidates (at most ``router.max_attempts``): a connect
error, a 5xx or no response head within the first-byte timeout moves on to the next one
and is counted in ``synapse_upstream_retries_total``; a 4xx is the client's error and is
passed back as is. Once the client has received a byte nothing is retried: a broken
stream ends with an SSE error event.

The ledger sees each attempt: dispatch before the POST, first byte when the answer (or
the stream's first chunk) arrives, finish in ``finally`` — also when the client went
away and aiohttp cancelled the handler, which is also what closes the upstream response
and so cancels the request on the backend.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from controlplane import errors
from controlplane.adapters import upstream as upstream_mod
from controlplane.api import context
from controlplane.core import cache_port, sse
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from controlplane.core import usage as usage_mod

log = logging.getLogger("synapse.controlplane.proxy")

_background: set[asyncio.Task[Any]] = set()
# Not passed back: hop-by-hop headers and those aiohttp sets itself. Content-Encoding is
# kept: bodies are forwarded undecoded.
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                          "server", "date"})


def keep(task: asyncio.Task[Any]) -> None:
    """Hold a fire-and-forget task until it ends (the loop keeps only weak references)."""
    _background.add(task)
    task.add_done_callback(_background.discard)


def _reason_label(reason: str) -> str:
    # Metric label: the first word only ("prefix-hit 87%" → "prefix-hit"), bounded.
    return reason.split(" ", 1)[0].rstrip(",")


def _headers(backend: core_types.BackendState, request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "x-request-id": request_id}
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
    return headers


async def forward(request: web.Request, route: core_types.RouteDecision,
                  prompt: router_mod.Prompt, body: bytes, path: str, stream: bool,
                  store: cache_port.CacheDecision | None) -> web.StreamResponse:
    svc = request.app[context.SERVICES]
    ctx = context.get(request)
    last: errors.SynapseError = errors.Unavailable("no backend could be tried")
    why = ""
    candidates = route.candidates[:svc.settings.router.max_attempts]
    for attempt, verdict in enumerate(candidates):
        backend = verdict.backend
        if attempt:
            svc.metrics.upstream_retries.labels(route.model, why).inc()
        ticket = svc.router.dispatched(route, verdict, prompt)
        try:
            up = await svc.upstream.post(backend.url + path, body,
                                         _headers(backend, ctx.request_id))
        except upstream_mod.FirstByteTimeout:
            svc.ledger.finish(ticket)
            why = "timeout"
            last = errors.UpstreamTimeout(
                f"backend {backend.key} sent no response within "
                f"{svc.settings.http.upstream_first_byte_timeout_s:g}s")
            continue
        except upstream_mod.FAILURES as exc:
            svc.ledger.finish(ticket)
            why = "connect"
            last = errors.UpstreamError(f"backend {backend.key} failed: {_describe(exc)}")
            continue
        except BaseException:
            svc.ledger.finish(ticket)
            raise
        try:
            if up.status >= 500:
                why = "5xx"
                last = await _server_error(up, backend)
                continue
            ctx.backend = backend.key
            ctx.route = route.reason if attempt == 0 else f"{route.reason}, retry {attempt}"
            svc.child(svc.metrics.route_decisions, backend.key,
                      _reason_label(route.reason)).inc()
            if stream and up.status == 200 and _is_sse(up):
                # Chat streams open with a role-only event that engines may send before
                # the prefill is done; the first token is the event after it.
                first_token_event = 2 if path.endswith("chat/completions") else 1
                return await _stream(request, up, ticket, store, first_token_event)
            return await _whole(request, up, ticket, store)
        finally:
            up.close()
            svc.ledger.finish(ticket)
            svc.router.observe(ticket)  # the router learns from the settled attempt
    raise last


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def _is_sse(up: upstream_mod.UpstreamResponse) -> bool:
    return up.content_type == "text/event-stream"


async def _server_error(up: upstream_mod.UpstreamResponse,
                        backend: core_types.BackendState) -> errors.SynapseError:
    try:
        async with asyncio.timeout(1.0):
            detail = (await up.read_some(300)).decode("utf-8", "replace")
    except upstream_mod.FAILURES:
        detail = ""
    return errors.UpstreamError(
        f"backend {backend.key} answered with status {up.status}"
        + (f": {detail}" if detail else ""))


def _response_headers(up: upstream_mod.UpstreamResponse, ctx: context.RequestContext,
                      ) -> dict[str, str]:
    headers = {k: v for k, v in up.headers
               if k.lower() not in _HOP_HEADERS and not k.lower().startswith("x-synapse")
               and k.lower() != "x-request-id"}
    headers.update(ctx.headers())
    return headers


async def _whole(request: web.Request, up: upstream_mod.UpstreamResponse, ticket: Any,
                 store: cache_port.CacheDecision | None) -> web.Response:
    svc = request.app[context.SERVICES]
    ctx = context.get(request)
    try:
        data = await up.read()
    except upstream_mod.FAILURES as exc:
        raise errors.UpstreamError(f"backend {ctx.backend} broke off its answer: "
                                   f"{_describe(exc)}") from None
    svc.ledger.first_byte(ticket)
    ctx.first_byte = svc.clock()
    if up.status == 200:
        ticket.usage = usage_mod.from_tail(data)
    if up.status >= 400:
        data = _as_openai_error(up.status, data)
    elif store is not None:
        _maybe_store(svc.cache, store, data)
    ctx.headers_sent = True
    headers = _response_headers(up, ctx)
    if up.status >= 400:
        headers["Content-Type"] = "application/json"
    return web.Response(status=up.status, body=data, headers=headers)


def _as_openai_error(status: int, data: bytes) -> bytes:
    """A backend's 4xx body in the OpenAI envelope (vLLM's has an integer ``code``; others
    send no envelope at all), keeping its message, type and param."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = data.decode("utf-8", "replace")[:500]
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(inner, dict):
        code = inner.get("code")
        return orjson.dumps({"error": {
            "message": str(inner.get("message") or "the backend refused the request"),
            "type": str(inner.get("type") or "invalid_request_error"),
            "param": inner.get("param") if isinstance(inner.get("param"), str) else None,
            "code": code if isinstance(code, str) or code is None else f"upstream_{code}"}})
    if isinstance(parsed, dict):
        parsed = parsed.get("message") or parsed.get("detail") or str(parsed)
    err = errors.BadRequest(f"backend refused the request: {parsed}",
                            code=f"upstream_{status}")
    return orjson.dumps(err.envelope())


def _maybe_store(cache: cache_port.ResponseCache, decision: cache_port.CacheDecision,
                 data: bytes) -> None:
    try:
        response = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if not isinstance(response, dict):
        return
    choices = response.get("choices") or []
    if choices and all(c.get("finish_reason") in sse.CACHEABLE_FINISH for c in choices):
        cache.store(decision, response)


async def _stream(request: web.Request, up: upstream_mod.UpstreamResponse, ticket: Any,
                  store: cache_port.CacheDecision | None,
                  first_token_event: int) -> web.StreamResponse:
    svc = request.app[context.SERVICES]
    ctx = context.get(request)
    headers = _response_headers(up, ctx)
    headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(status=200, headers=headers)
    parser = sse.SSEParser() if store is not None else None
    assembler = sse.StreamAssembler() if store is not None else None
    tail = b""
    first = True
    events = 0
    idle = svc.settings.http.upstream_idle_timeout_s
    while True:
        try:
            chunk = await up.next_chunk(idle)
        except upstream_mod.FAILURES as exc:
            if first:
                raise errors.UpstreamError(f"backend {ctx.backend} broke off before its "
                                           f"first chunk: {_describe(exc)}") from None
            return await _broken(request, resp,
                                 f"the backend's stream broke off: {_describe(exc)}")
        if chunk is None:
            break
        if first:
            first = False
            ctx.first_byte = svc.clock()
            ctx.headers_sent = True
            await resp.prepare(request)
        if events < first_token_event:
            # The ledger moves the request from prefill to decode at its first token.
            events += chunk.count(b"data:")
            if events >= first_token_event:
                ticket.streamed = True
                svc.ledger.first_byte(ticket)
        # A client that went away raises here and ends the handler (and the upstream).
        await resp.write(chunk)
        tail = (tail + chunk)[-usage_mod.TAIL_BYTES:]
        if parser is not None and assembler is not None:
            for data in parser.feed(chunk):
                assembler.add_data(data)
    if first:  # an empty stream: nothing was sent yet
        raise errors.UpstreamError(f"backend {ctx.backend} sent an empty stream")
    if b"[DONE]" not in tail:
        return await _broken(request, resp, "the backend's stream ended before [DONE]")
    ticket.usage = usage_mod.from_tail(tail)
    if assembler is not None and store is not None and assembler.complete:
        svc.cache.store(store, assembler.response())
    await resp.write_eof()
    return resp


async def _broken(request: web.Request, resp: web.StreamResponse,
                  message: str) -> web.StreamResponse:
    ctx = context.get(request)
    log.warning("stream to the client cut: %s", message,
                extra={"request_id": ctx.request_id, "backend": ctx.backend})
    ctx.broken = True
    if not resp.prepared:
        ctx.headers_sent = True
        await resp.prepare(request)
    await resp.write(sse.error_event(message))
    await resp.write_eof()
    return resp
