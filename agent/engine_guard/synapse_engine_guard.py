"""An ASGI middleware vLLM loads (``--middleware synapse_engine_guard.Guard``) so that
every path of the engine, not only ``/v1``, wants the engine key.

vLLM's own ``--api-key`` / ``VLLM_API_KEY`` guards only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``; ``/invocations`` (the same chat and completions),
``/tokenize``, ``/pooling``, ``/score``, ``/rerank`` and the rest answer anyone who
reaches the port, and an engine listening on the node's address is reached by every pod
without NetworkPolicies. This guard answers 401 to any request without
``Authorization: Bearer <VLLM_API_KEY>`` except ``GET``/``HEAD /health`` (liveness
alone, nothing a tenant sent) and CORS preflights: an ``OPTIONS`` request that carries
``Origin`` and ``Access-Control-Request-Method``, which vLLM's CORS middleware (inside
this one) answers itself, so it reaches no handler. Any other ``OPTIONS`` wants the key:
vLLM mounts Prometheus' ASGI app on ``/metrics``, which answers every method, so a bare
``OPTIONS /metrics`` let through returned the engine's metrics to anyone. Without
``VLLM_API_KEY`` it lets everything through: no key, nothing to ask.

It runs inside the engine's own Python (vLLM's venv, whatever its packages): one file,
the standard library only, loaded from the directory the agent puts on the engine's
``PYTHONPATH`` (:data:`agent.core.commands.GUARD_DIR`). The key is compared as sha256
digests in constant time, read from the environment once, and never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

OPEN = frozenset({("GET", "/health"), ("HEAD", "/health")})
_REFUSAL = b'{"error": {"message": "Unauthorized", "type": "authentication_error", ' \
    b'"code": "invalid_api_key"}}'


class Guard:
    def __init__(self, app: Any) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _presented(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and self._digest is not None:
                    return hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                               self._digest)
                return False
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (self._digest is None or scope.get("type") not in ("http", "websocket")
                or self._open(scope) or self._presented(scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(_REFUSAL)).encode())]})
        await send({"type": "http.response.body", "body": _REFUSAL})

    @staticmethod
    def _open(scope: dict[str, Any]) -> bool:
        method = scope.get("method", "")
        if method == "OPTIONS":
            return _preflight(scope)
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        return (method, path) in OPEN


def _preflight(scope: dict[str, Any]) -> bool:
    """Whether an ``OPTIONS`` request is a CORS preflight (what the CORS middleware takes)."""
    names = {name.lower() for name, _ in scope.get("headers") or ()}
    return b"origin" in names and b"access-control-request-method" in names
