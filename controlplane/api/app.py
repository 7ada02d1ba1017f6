"""The aiohttp application: routes, the one error middleware, resources.

``create_app`` builds everything from the settings (or takes prepared ``Services``, which
``main`` shares with the gRPC server). Resources that live as long as the app — the
upstream ``ClientSession``, the Redis client, the upstream health probe task, the
response cache — are opened and closed in ``cleanup_ctx``, in that order and reverse.

The middleware is the single exit of every request: it turns :mod:`controlplane.errors`
(and aiohttp's own 404/405/413, and a body that does not decode) into the OpenAI error
envelope — into Anthropic's shape under ``/v1/messages``, unknown sub-paths included, as
the Anthropic SDKs read only that — adds ``x-request-id`` and ``x-synapse-*`` headers,
and records metrics and stats once per request. A client's
``x-request-id`` is kept when it is printable ASCII of at most 128 characters (it goes
into the response headers, the access log and names the request to that client);
otherwise the request gets a fresh id, logged at debug level. Engines never get the
client's id (vLLM names and aborts requests by it, and any tenant may send any id):
they get an id Synapse generated for the request (``RequestContext.engine_id``).
Errors below the handlers (a request aiohttp cannot parse, a refused ``Expect``) are
:mod:`controlplane.api.server`'s, in the same two shapes.

``/metrics`` is served here unless ``metrics.port`` moves it to an app of its own
(:func:`create_metrics_app`); here, with tenant keys, it needs the admin key, and
``metrics.bearer_token_file`` makes it need that token on either
(:mod:`controlplane.api.observability` says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
from aiohttp import http_exceptions, typedefs, web, web_protocol

from controlplane import config, errors
from controlplane.adapters import node_embed, redis_limits
from controlplane.api import (
    cache_feedback,
    calls,
    context,
    embeddings,
    fairness_wiring,
    fleet_stats,
    observability,
    openapi,
    ops,
    readiness,
    salt_learning,
    serving,
    surface,
    upstream_wiring,
)
from controlplane.api import services as services_mod
from controlplane.core import anthropic_errors, cache_port, ratelimit, types, validation
from synapse_common import aiotasks, tasks
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.api")

_PROBE_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("probe_task", asyncio.Task)
_DOCUMENTS_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("documents_task", asyncio.Task)


def json_response(data: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def error_response(exc: errors.SynapseError, ctx: context.RequestContext,
                   path: str = "") -> web.Response:
    """``exc`` in the OpenAI envelope, or in Anthropic's shape under ``/v1/messages``
    (every error there is, the middleware's own included)."""
    if anthropic_errors.covers(path):
        status, body, extra = anthropic_errors.render(exc, ctx.request_id)
        return web.Response(status=status, body=body, content_type="application/json",
                            headers={**ctx.headers(), **extra, "request-id": ctx.request_id})
    return json_response(exc.envelope(), exc.http_status, {**ctx.headers(), **exc.headers()})


async def _close_after(request: web.Request, resp: web.Response) -> web.Response:
    """Send ``resp`` and close the connection at once: the client is too slow to be
    waited for (aiohttp would otherwise linger, reading the rest of its body)."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()
    return resp


def _payload_error(exc: web_protocol.RequestPayloadError) -> errors.SynapseError:
    """The 400 of a body aiohttp could not read: one whose ``Content-Encoding`` does not
    decode, or whose chunked framing breaks off. The connection is closed after it (what
    follows the bad bytes cannot be framed), so aiohttp does not read on and log it."""
    if isinstance(exc.__cause__, http_exceptions.ContentEncodingError):
        return errors.BadRequest("the request body does not decode as its Content-Encoding "
                                 "header says", code="invalid_body")
    return errors.BadRequest("the request body's framing is invalid", code="invalid_body")


def _from_http(exc: web.HTTPException, request: web.Request) -> errors.SynapseError:
    if exc.status == 404:
        return errors.NotFound(f"no route {request.method} {request.path}; "
                               "GET /openapi.json describes the API", code="unknown_route")
    if exc.status == 405:
        return errors.with_status(405, f"method {request.method} is not allowed on "
                                  f"{request.path}", code="method_not_allowed")
    if exc.status == 413:
        return errors.PayloadTooLarge("the request body is over the limit "
                                      "(http.max_body_bytes)")
    return errors.with_status(exc.status, exc.reason or "bad request",
                              code=f"http_{exc.status}")


def _request_ids(request: web.Request, svc: services_mod.Services) -> tuple[str, str]:
    """(the id the client knows the request by, the id engines get): the client's own
    and a fresh one, or one fresh id for both."""
    rid = request.headers.get("x-request-id")
    if rid is None:
        fresh = svc.new_request_id()
        return fresh, fresh
    if validation.printable_ascii(rid, validation.REQUEST_ID_MAX):
        return rid, svc.new_request_id()
    fresh = svc.new_request_id()
    log.debug("x-request-id replaced by %s: not 1 to %d printable ASCII characters",
              fresh, validation.REQUEST_ID_MAX)
    return fresh, fresh


@web.middleware
async def middleware(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
    svc = request.app[context.SERVICES]
    rid, engine_id = _request_ids(request, svc)
    ctx = context.RequestContext(svc, rid, svc.clock(), engine_id=engine_id)
    request[context.CONTEXT] = ctx
    api = request.path.startswith("/v1/") or request.path in tasks.ROUTES
    scope = ops.begin(request, svc, ctx) if api else None    # the trace (issue 19)
    status = 500
    try:
        try:
            resp = await handler(request)
        except errors.RequestTimeout as exc:
            resp = await _close_after(request, error_response(exc, ctx, request.path))
        except web_protocol.RequestPayloadError as exc:
            if ctx.headers_sent:
                raise
            resp = await _close_after(request, error_response(_payload_error(exc), ctx,
                                                                  request.path))
        except errors.SynapseError as exc:
            if ctx.headers_sent:
                raise
            resp = error_response(exc, ctx, request.path)
        except web.HTTPException as exc:
            resp = error_response(_from_http(exc, request), ctx, request.path)
            if isinstance(exc, web.HTTPMethodNotAllowed):
                resp.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        except asyncio.CancelledError:
            if not readiness.cut(svc):
                status = 499  # the client went away (nginx's convention)
                raise
            resp = _cut_by_shutdown(request, ctx)
        except ConnectionResetError:
            status = 499
            raise
        except Exception:
            if ctx.headers_sent:
                raise
            log.exception("unexpected error", extra={"request_id": ctx.request_id})
            resp = error_response(errors.internal(), ctx, request.path)
        status = resp.status
        if not resp.prepared and "x-request-id" not in resp.headers:
            resp.headers.update(ctx.headers())
        return resp
    finally:
        if api:
            if ctx.tenant:
                svc.loop_share.charge(ctx.tenant, ctx.work_s)
            _record(svc, ctx, status, _route(request))
            ops.finish(request, svc, ctx, status, scope)   # trace end, access-log line


def _cut_by_shutdown(request: web.Request, ctx: context.RequestContext) -> web.Response:
    """The handler was cancelled at the end of the shutdown grace: a request not yet
    answered gets 503 ``server_shutting_down`` (a client retries it on another replica).
    A stream is ended by its own path (``proxy.pump``); one cut elsewhere after its
    headers can only be marked broken (the cancellation goes on)."""
    if ctx.headers_sent:
        ctx.broken = True
        raise asyncio.CancelledError
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    resp = error_response(errors.Unavailable(readiness.SHUTTING_DOWN,
                                             code=readiness.SHUTTING_DOWN_CODE),
                          ctx, request.path)
    resp.force_close()
    return resp


def _route(request: web.Request) -> str:
    """The metrics' ``route`` label: the matched path (bounded: unknown paths are one)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _record(svc: services_mod.Services, ctx: context.RequestContext, status: int,
            route: str) -> None:
    now = svc.clock()
    model = ctx.model or "unknown"
    m = svc.metrics
    svc.child(m.requests, model, str(status), ctx.tenant or "unknown", route).inc()
    svc.child(m.request_duration, model, ctx.cache, route).observe(now - ctx.started)
    if ctx.first_byte is not None:
        svc.child(m.time_to_first_byte, model, ctx.cache, route).observe(
            ctx.first_byte - ctx.started)
    error = status >= 400 or ctx.broken
    svc.stats.record(ctx.model, ctx.backend or None, now - ctx.started, error, ctx.cache)


# -- small routes ---------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


routable_count = readiness.routable_count


async def ready(request: web.Request) -> web.Response:
    status, body = readiness.check(request.app[context.SERVICES])
    return json_response(body, status=status)


async def list_models(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    tenant = svc.tenants.authenticate(request.headers.get("Authorization"))
    context.get(request).tenant = tenant.name
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "synapse",
             **({"root": canonical} if canonical else {}),
             **_context_length(svc.registry.routable(canonical or name))}
            for name, canonical in svc.catalog.listing(svc.registry.served_models())
            if tenant.allows(canonical or name)]
    return json_response({"object": "list", "data": data})


def _context_length(backends: list[types.BackendState]) -> dict[str, int]:
    """``max_model_len`` as vLLM lists it, when every routable backend of the model says
    its own: the smallest, since a request may go to any of them; else nothing."""
    lengths = [b.max_model_len for b in backends]
    return {"max_model_len": min(lengths)} if lengths and all(lengths) else {}


async def stats(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    svc.tenants.authenticate_admin(request.headers.get("Authorization"))
    snap = await fleet_stats.snapshot(svc)      # every replica, through Redis (issue 19)
    snap["fairness"] = await fairness_wiring.stats(svc)
    return json_response(snap)


async def openapi_spec(request: web.Request) -> web.Response:
    return json_response(openapi.spec(request.app[context.SERVICES].settings))


# -- resources --------------------------------------------------------------------------


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[context.SERVICES]
    await svc.upstream.start()
    g = svc.settings.grpc
    svc.node_embed = node_embed.NodeEmbedClient(
        key_of=svc.registry.node_key_at,
        credentials=node_embed.Credentials.load(g.node_ca_file, g.node_server_name),
        pin_of=svc.registry.node_pin_at, plain_text=not g.node_tls_required)
    yield
    await svc.node_embed.close()
    await svc.upstream.close()


@context.with_redis
async def _redis_ctx(app: web.Application, svc: services_mod.Services,
                     url: str) -> AsyncIterator[None]:
    client = redis_limits.connect(url)
    h = svc.settings.http
    # A slot is taken before the body is read (serving.acquire): its lease covers the
    # body's upload, the tenant's turn on the loop before and after it (loop_share), the
    # backend's first byte and a gap of the stream, with a minute to spare.
    lease = (h.body_timeout_s + 2 * svc.loop_share.max_wait_s
             + h.upstream_first_byte_timeout_s + h.upstream_idle_timeout_s + 60.0)
    store = redis_limits.RedisLimitStore(client, svc.settings.redis.timeout_s, lease)

    def on_error(exc: Exception) -> None:
        svc.metrics.redis_errors.labels("rate_limit").inc()
        log.debug("redis rate limit call failed: %s", exc)

    svc.limiter = ratelimit.RateLimiter(svc.local_limits, store, on_error)
    yield
    await client.aclose()


async def _probe_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[context.SERVICES]
    readiness.state(svc)                    # readiness counts from here
    learner = salt_learning.Learner(svc)    # backends' own documents, of cache_salt
    loop = asyncio.get_running_loop()
    if svc.settings.upstreams:
        app[_PROBE_TASK] = loop.create_task(upstream_wiring.build(svc, learner).run())
    app[_DOCUMENTS_TASK] = loop.create_task(salt_learning.ExternalDocuments(svc, learner).run())
    yield
    await aiotasks.stop(app.get(_PROBE_TASK), app.get(_DOCUMENTS_TASK))


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[context.SERVICES].cache.close()


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    """The fleet service's reconcile loop (operator intent → registry, agents)."""
    fleet = app[context.SERVICES].fleet
    fleet.start()
    yield
    await fleet.stop()


def create_app(settings: config.ControlPlaneSettings, *,
               services: services_mod.Services | None = None,
               response_cache: cache_port.ResponseCache | None = None,
               clock: clocks.Clock = clocks.monotonic) -> web.Application:
    """The HTTP application. ``response_cache`` None means :class:`NullCache`."""
    svc = services or services_mod.build(settings, clock=clock, response_cache=response_cache)
    app = web.Application(middlewares=[middleware],
                          client_max_size=settings.http.max_body_bytes)
    app[context.SERVICES] = svc
    app.cleanup_ctx.extend([_upstream_ctx, _redis_ctx, _probe_ctx, _cache_ctx, _fleet_ctx])
    fairness_wiring.install(app, svc)   # token limits, usage, fair queue, coalescing
    ops.install(app, svc)               # tracing and the access log (issue 19)
    fleet_stats.install(app)            # answering the other replicas' stats questions
    expect = calls.continue_if_known    # no 100 Continue without a valid key
    app.router.add_post("/v1/chat/completions", serving.chat_completions,
                        expect_handler=expect)
    app.router.add_post("/v1/completions", serving.completions, expect_handler=expect)
    app.router.add_post("/v1/embeddings", embeddings.embeddings, expect_handler=expect)
    surface.install(app)                # responses, messages, audio, rerank, tokenize
    app.router.add_post("/v1/cache/feedback", cache_feedback.feedback, expect_handler=expect)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    if settings.metrics.port is None:
        observability.install(app, on_api_port=True)
    app.router.add_get("/api/v1/stats", stats)
    app.router.add_get("/openapi.json", openapi_spec)
    return app


def create_metrics_app(svc: services_mod.Services) -> web.Application:
    """``/metrics`` alone, for ``metrics.port`` (same middleware, so errors are envelopes)."""
    app = web.Application(middlewares=[middleware])
    app[context.SERVICES] = svc
    observability.install(app, on_api_port=False)
    return app
