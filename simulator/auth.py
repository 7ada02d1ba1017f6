"""The engine key: with ``api_key`` set, callers must present ``Authorization: Bearer
<key>`` everywhere but ``GET``/``HEAD /health``, as on the agent's engines once it
passes them the engine key (:mod:`synapse_common.engine_key`).

The agent starts vLLM behind its guard middleware
(``agent/engine_guard/synapse_engine_guard.py``), which asks for the key on every path
but ``/health``: vLLM's own key covers only ``/v1``, ``/v2``, ``/inference`` and
``/cohere``, and the rest (``/tokenize``, ``/invocations``, ``/metrics``…) answered any
pod. The simulator imitates that guarded engine, in TEI mode too. Its own hooks are no
exception: ``/sim/faults`` (``hang``, ``crash_after``, ``error_rate``) and ``/sim/state``
would let any local process take down every tenant's traffic, since in embedded mode the
simulator is the live engine. The agent sends the key on its probes and scrapes
(``/health``, ``/metrics``, ``/openapi.json``); the chaos bench and the tests send it on
``/sim/*``. Without a key every caller is served: no key, nothing to ask.

The refusal is a 401 in the simulator's error shapes (the OpenAI envelope, TEI's on its
native routes). CORS preflights (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) carry no credentials and pass, as through the guard;
any other ``OPTIONS`` wants the key there and here (behind the guard, vLLM's ``/metrics``
answered a bare ``OPTIONS`` with the metrics). The key is compared in constant time and
never echoed.
"""

from __future__ import annotations

import hmac

from aiohttp import typedefs, web

from simulator import errors

OPEN = frozenset({("GET", "/health"), ("HEAD", "/health")})


def guarded(method: str, path: str, preflight: bool = False) -> bool:
    """Whether a request needs the key (when one is set); ``preflight``: it carries the
    headers of a CORS preflight (only an ``OPTIONS`` one passes for it)."""
    if method == "OPTIONS":
        return not preflight
    return (method, path) not in OPEN


def presented(request: web.Request, key: str) -> bool:
    """Whether the request carries ``Bearer <key>`` (the scheme in any case, as vLLM)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), key.encode())


def middleware(key: str) -> typedefs.Middleware:
    """Refuses a request that does not present ``key``, unless :func:`guarded` says no."""
    @web.middleware
    async def check(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
        preflight = ("Origin" in request.headers
                     and "Access-Control-Request-Method" in request.headers)
        if guarded(request.method, request.path, preflight) and not presented(request, key):
            raise errors.Unauthorized("missing or invalid API key: this engine requires "
                                      "'Authorization: Bearer <key>'")
        return await handler(request)
    return check
