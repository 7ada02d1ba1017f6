"""Relaying a backend's answer on the paths beyond chat and completions.

:mod:`controlplane.core.dispatch` chooses the backend, retries before the first byte and
keeps the ledger, as for chat; this module turns the attempt it hands over into the
client's response through a :class:`Shape`, which says what the client receives:

* :class:`Shape` itself passes everything through: a whole answer as it came (a
  backend's 4xx in the OpenAI envelope), an event stream or a binary body (speech audio)
  chunk by chunk as it arrives, ``await resp.write`` giving back-pressure, never held
  whole;
* subclasses translate (Anthropic Messages over chat completions), render errors in
  another shape, or observe the answer (a Responses id, a stream to cache).

Once the client has received a byte nothing is retried: a broken event stream ends with
the shape's error event; a broken binary body is cut (the connection closes, so the
client sees a short body rather than a complete-looking one).
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from controlplane import errors
from controlplane.adapters import http1
from controlplane.api import context, fairness, proxy
from controlplane.core import dispatch, sse, stream_shapes
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from controlplane.core import usage as usage_mod

log = logging.getLogger("synapse.controlplane.relay")

# Answers streamed to the client as they arrive even when the request did not say
# ``stream``: event streams, and binary media (speech).
_STREAMED_PREFIXES = ("audio/", "application/octet-stream")


class Shape:
    """Pass-through; subclasses override what they change."""

    def start(self, attempt: dispatch.Attempt) -> None:
        """The attempt whose answer is relayed (its backend, its status)."""

    def headers(self) -> dict[str, str]:
        """Headers the answer carries beside the backend's and Synapse's own."""
        return {}

    def whole(self, data: bytes) -> bytes:
        """The client's body for a backend's whole 2xx answer."""
        return data

    def refusal(self, status: int, data: bytes) -> tuple[bytes, str]:
        """(body, content type) for a backend's 4xx."""
        return orjson.dumps(errors.BackendRefusal.from_body(status, data).envelope()), \
            "application/json"

    def chunk(self, data: bytes) -> bytes:
        """What to send for the next piece of a streamed answer."""
        return data

    def end(self) -> bytes:
        """What to send once the backend's stream ended properly."""
        return b""

    def broken(self, message: str) -> bytes:
        """The event that ends an event stream the backend broke off."""
        return sse.event(errors.stream_interrupted(message))

    def content_type(self, backend_type: str) -> str | None:
        """The streamed response's Content-Type (None: the backend's)."""
        return None

    def usage(self, found: usage_mod.Usage | None) -> usage_mod.Usage | None:
        """The usage to account (the engine's, found in the answer's last bytes)."""
        return found


def streamed(content_type: str) -> bool:
    return content_type == stream_shapes.EVENT_STREAM or content_type.startswith(
        _STREAMED_PREFIXES)


async def forward(request: web.Request, route: core_types.RouteDecision,
                  prompt: router_mod.Prompt, body: bytes, path: str, shape: Shape, *,
                  dispatcher: dispatch.Dispatcher | None = None) -> web.StreamResponse:
    """The answer of the first backend of ``route`` that answers (``dispatcher``: the
    services' own unless an upload brings one with its own transport)."""
    svc, ctx = context.of(request)
    d = dispatcher or svc.dispatcher
    http1.charge(proxy.budget_key(ctx))
    async with d.exchange(route, prompt, path, body, ctx.request_id,
                          engine_id=ctx.engine_id) as attempt:
        ctx.backend = attempt.backend.key
        ctx.retries = attempt.index
        ctx.route = (route.reason if attempt.index == 0
                     else f"{route.reason}, retry {attempt.index}")
        svc.child(svc.metrics.route_decisions, ctx.backend,
                  proxy._reason_label(route.reason)).inc()
        shape.start(attempt)
        up = attempt.answer
        try:
            if up.status == 200 and streamed(up.content_type):
                return await _stream(request, attempt, shape)
            resp = await _whole(request, attempt, shape)
        finally:    # the answer's status and usage, for the tenant's tokens and usage
            found = attempt.ticket.usage if attempt.ticket is not None else None
            ctx.usage = fairness.answered(request, attempt.status, shape.usage(found))
    return await proxy.send_whole(request, resp) if proxy.large(resp) else resp


async def _whole(request: web.Request, attempt: dispatch.Attempt,
                 shape: Shape) -> web.Response:
    svc, ctx = context.of(request)
    data = await attempt.read()
    ctx.first_byte = svc.clock()
    status = attempt.status
    headers = {**proxy._response_headers(attempt, ctx), **shape.headers()}
    if status >= 400:
        data, headers["Content-Type"] = shape.refusal(status, data)
    else:
        data = shape.whole(data)
    ctx.headers_sent = True
    return web.Response(status=status, body=data, headers=headers)


async def _stream(request: web.Request, attempt: dispatch.Attempt,
                  shape: Shape) -> web.StreamResponse:
    ctx = context.get(request)
    headers = {**proxy._response_headers(attempt, ctx), **shape.headers()}
    backend_type = attempt.answer.content_type
    sse_stream = backend_type == stream_shapes.EVENT_STREAM
    if (ours := shape.content_type(backend_type)) is not None:
        headers["Content-Type"] = ours
    if sse_stream:
        headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(status=200, headers=headers)
    # Events' content deltas, the estimate should the engine's usage not come (a binary
    # body has none to count: it is accounted as before).
    delivered = fairness.counter(request) if sse_stream else None

    async def write(chunk: bytes) -> None:
        if out := shape.chunk(chunk):
            await resp.write(out)
        if delivered is not None:
            delivered.feed(chunk)

    if (message := await proxy.pump(request, resp, attempt, write)) is not None:
        return await _broken(request, resp, shape, message, sse_stream)
    if tail := shape.end():
        await resp.write(tail)
    await resp.write_eof()
    return resp


async def _broken(request: web.Request, resp: web.StreamResponse, shape: Shape,
                  message: str, sse_stream: bool) -> web.StreamResponse:
    await proxy.cut(request, resp, message, log)
    if not sse_stream:
        # A binary body has no error event: close the connection instead of ending the
        # body, so the client cannot take a truncated file for a whole one.
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write(shape.broken(message))
    await resp.write_eof()
    return resp
