"""Operating the API like the tools people run: traces and the access log (issue 19).

The hook points (``/work/notes/ops-hooks.md`` lists them for every route):

* the middleware calls :func:`begin` when a ``/v1/`` request starts (the root span, child
  of the client's ``traceparent``) and :func:`finish` when it ends, however it ends (the
  root span's attributes and status, then the access-log line);
* handlers wrap their steps in ``synapse_common.tracing.span(NAME)`` (auth, cache.lookup,
  route, queue.wait, cache.write …) and the dispatcher makes one ``upstream`` span per
  attempt, whose context goes to the engine as ``traceparent``;
* :func:`routed` puts a route decision on the ``route`` span.

:func:`prepare` builds the process's tracing and access log from the settings once (``main``
calls it where configuration errors are reported; :func:`install` otherwise); the app's
cleanup flushes and stops the exporter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from controlplane.api import context
from controlplane.api import services as services_mod
from controlplane.core import access_log, dispatch
from synapse_common import tracing

SERVICE = "synapse-controlplane"


def prepare(svc: services_mod.Services) -> None:
    """Tracing and the access log from ``svc.settings`` (once; ValueError naming
    ``tracing.enabled`` when the OpenTelemetry packages are missing)."""
    if svc.access_log is not None:
        return
    s = svc.settings
    svc.tracing = tracing.setup(s.tracing, SERVICE, svc.replica)
    a = s.access_log
    svc.access_log = access_log.AccessLog(
        access_log.Policy(a.enabled, a.sample_ratio, a.sample_errors))


def install(app: web.Application, svc: services_mod.Services) -> None:
    prepare(svc)
    app.cleanup_ctx.append(_tracing_ctx)


async def _tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    t = app[context.SERVICES].tracing
    if t is not None:
        await asyncio.to_thread(t.shutdown)     # flushes what is buffered


def get_tracing(svc: services_mod.Services) -> tracing.Tracing | None:
    return svc.tracing


# -- per request ---------------------------------------------------------------------------


def begin(request: web.Request, svc: services_mod.Services,
          ctx: context.RequestContext) -> tracing.Scope | None:
    """The request's root span (or, tracing off, the client's ``traceparent`` to forward)."""
    t = svc.tracing
    if t is None:
        return tracing.forward(request.headers)
    resource = request.match_info.route.resource
    name = f"{request.method} {resource.canonical}" if resource is not None else request.method
    scope: tracing.Scope = t.begin(name, request.headers, {
        "http.request.method": request.method,
        "url.path": request.path[:access_log.FIELD_MAX],
        "synapse.request_id": ctx.request_id})
    return scope


def finish(request: web.Request, svc: services_mod.Services, ctx: context.RequestContext,
           status: int, scope: tracing.Scope | None) -> None:
    """The request ended with ``status``: close its trace, write its access-log line."""
    trace_id = ""
    if scope is not None:
        trace_id = scope.trace_id
        error = status >= 500 or ctx.broken
        scope.end(_root_attributes(ctx, status) if scope.span is not None else None,
                  error=(f"status {status}" if status >= 500 else "stream cut")
                  if error else None)
    log = svc.access_log
    if log is None or not log.wanted():
        return
    log.write(access_log.Line(
        request_id=ctx.request_id, method=request.method, path=request.path, status=status,
        duration_s=svc.clock() - ctx.started, tenant=ctx.tenant, model=ctx.model_asked,
        served=ctx.fallback or ctx.model, cache=ctx.cache, backend=ctx.backend,
        ttft_s=None if ctx.first_byte is None else ctx.first_byte - ctx.started,
        usage=ctx.usage, retries=ctx.retries, fallback=ctx.fallback, broken=ctx.broken,
        trace_id=trace_id, engine_id=ctx.engine_id))


def _root_attributes(ctx: context.RequestContext, status: int) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {"http.response.status_code": status,
                                   "synapse.cache": ctx.cache, "synapse.retries": ctx.retries}
    for key, value in (("synapse.tenant", ctx.tenant), ("gen_ai.request.model", ctx.model),
                       ("gen_ai.response.model", ctx.fallback or ctx.model),
                       ("synapse.backend", ctx.backend), ("synapse.fallback", ctx.fallback)):
        if value:
            attrs[key] = value
    if ctx.usage is not None:
        attrs["gen_ai.usage.input_tokens"] = ctx.usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = ctx.usage.completion_tokens
        if ctx.usage.cached_tokens is not None:
            attrs["synapse.usage.cached_tokens"] = ctx.usage.cached_tokens
    return attrs


def routed(span: object, plan: dispatch.Plan) -> None:
    """The route decision on the ``route`` span: the chosen backend, its predicted TTFT and
    cached prefix tokens, the policy, the reason, the fallback model if one was used."""
    set_attributes = getattr(span, "set_attributes", None)
    if set_attributes is None:
        return
    route = plan.route
    attrs: dict[str, str | int | float] = {
        "synapse.route.model": route.model, "synapse.route.policy": route.policy,
        "synapse.route.reason": route.reason, "synapse.route.candidates": len(route.candidates),
        "synapse.route.prompt_tokens": route.prompt.tokens}
    if route.candidates:
        best = route.candidates[0]
        attrs["synapse.route.backend"] = best.backend.key
        attrs["synapse.route.predicted_ttft_ms"] = round(best.predicted_ttft_s * 1000, 3)
        attrs["synapse.route.queue_wait_ms"] = round(best.queue_wait_s * 1000, 3)
        attrs["synapse.route.cached_tokens"] = best.cached_tokens
    if plan.fallback:
        attrs["synapse.route.fallback"] = plan.fallback
    set_attributes(attrs)
