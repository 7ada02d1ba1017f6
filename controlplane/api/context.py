"""Per-request state shared by the middleware and the handlers.

The middleware creates a :class:`RequestContext` (the app's services, request id, start
time), the handler fills in what it learns (tenant, model, cache status, backend, route),
and the middleware turns it into response headers, metrics and stats in one place when
the request ends — whether it ended in a response, an error or a client abort.

The context carries the services so that the serving path's helpers, each handed the
request, reach both with one lookup (:func:`of`) instead of going through
``request.app`` (three attribute lookups in aiohttp) at every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from controlplane.api import services as services_mod
from controlplane.core import usage as usage_mod

if TYPE_CHECKING:
    from controlplane.api import fairness as fairness_mod

SERVICES: web.AppKey[services_mod.Services] = web.AppKey("services", services_mod.Services)


@dataclasses.dataclass(slots=True)
class RequestContext:
    svc: services_mod.Services      # the services of the app serving the request
    request_id: str
    started: float
    tenant: str = ""
    model: str = ""
    cache: str = "bypass"
    backend: str = ""
    route: str = ""
    fallback: str = ""
    first_byte: float | None = None
    headers_sent: bool = False
    broken: bool = False            # a stream ended with an error event
    # for the access log and the trace (controlplane.api.ops)
    model_asked: str = ""           # the model as the client named it
    retries: int = 0                # attempts before the one that answered
    usage: usage_mod.Usage | None = None    # the engine's usage of the answer
    # the request's tokens and usage once admitted (controlplane.api.fairness)
    flow: fairness_mod.Flow | None = None
    # the x-request-id engines get: Synapse's (``request_id`` when Synapse made that too),
    # never the client's, which vLLM would take as the request's own (core.request_ids)
    engine_id: str = ""
    # seconds of the event loop this request's synchronous work took (parsing, the
    # prompt, routing), charged to its tenant's share when it ends (core.loop_share)
    work_s: float = 0.0

    def headers(self) -> dict[str, str]:
        """The x-synapse headers every response carries (as known so far)."""
        h = {"x-request-id": self.request_id, "x-synapse-cache": self.cache}
        if self.backend:
            h["x-synapse-backend"] = self.backend
        if self.route:
            h["x-synapse-route"] = self.route
        if self.fallback:
            h["x-synapse-fallback"] = self.fallback
        return h


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("synapse_context", RequestContext)


def get(request: web.Request) -> RequestContext:
    """The context of a request the middleware has seen (the serving path's hot functions
    index ``request[CONTEXT]`` themselves: a call per use costs more than the lookup)."""
    ctx: RequestContext = request[CONTEXT]
    return ctx


def of(request: web.Request) -> tuple[services_mod.Services, RequestContext]:
    """The services and the context of a request the middleware has seen."""
    ctx: RequestContext = request[CONTEXT]
    return ctx.svc, ctx


def with_redis(ctx: Callable[[web.Application, services_mod.Services, str], AsyncIterator[None]],
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs ``ctx(app, services, url)`` only when ``redis.url`` is
    set (``url``: its value); without Redis there is nothing to start or stop."""
    async def run(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        url = svc.settings.redis.url
        if url is None:
            yield
            return
        async for _ in ctx(app, svc, url.get_secret_value()):
            yield
    return run
