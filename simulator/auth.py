"""The engine key: with ``api_key`` set, callers must present ``Authorization: Bearer
<key>`` on the paths the imitated engine guards, as the agent's engines do when it passes
them the engine key (:mod:`synapse_common.engine_key`).

Which paths, per engine:

* vLLM (and the speech server, which has only ``/v1`` routes): paths under vLLM's
  guarded prefixes, ``/v1``, ``/v2``, ``/inference`` and ``/cohere``
  (``vllm/entrypoints/serve/middleware/authenticate.py``). The rest stay open there as in
  vLLM: ``/health``, ``/metrics``, ``/openapi.json``, and ``/tokenize``, ``/detokenize``,
  ``/rerank``, ``/score`` without the prefix;
* TEI: every route but ``/health``, ``/metrics`` (TEI's public routes) and
  ``/openapi.json`` (where the agent learns what the simulator serves).

``/sim/faults`` stays open in every mode: it is the simulator's own test hook, which the
chaos bench sets on engines an agent started.

The refusal is a 401 in the simulator's error shapes (the OpenAI envelope, TEI's on its
native routes), where vLLM answers ``{"error": "Unauthorized"}`` and TEI an empty body.
The key is compared in constant time and never echoed.
"""

from __future__ import annotations

import hmac

from aiohttp import typedefs, web

from simulator import errors

VLLM_GUARDED = ("/v1", "/v2", "/inference", "/cohere")
TEI_OPEN = frozenset({"/health", "/metrics", "/openapi.json"})
ALWAYS_OPEN = frozenset({"/sim/faults"})


def guarded(engine: str, path: str) -> bool:
    """Whether ``engine`` requires the key on ``path``."""
    if path in ALWAYS_OPEN:
        return False
    if engine == "tei":
        return path not in TEI_OPEN
    return path.startswith(VLLM_GUARDED)


def presented(request: web.Request, key: str) -> bool:
    """Whether the request carries ``Bearer <key>`` (the scheme in any case, as vLLM)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), key.encode())


def middleware(engine: str, key: str) -> typedefs.Middleware:
    """Refuses a request to a guarded path that does not present ``key``."""
    @web.middleware
    async def check(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" and guarded(engine, request.path) \
                and not presented(request, key):
            raise errors.Unauthorized("missing or invalid API key: this engine requires "
                                      "'Authorization: Bearer <key>'")
        return await handler(request)
    return check
