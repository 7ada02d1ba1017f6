"""The agent's ``/metrics`` (Prometheus text) and ``/healthz`` over aiohttp.

Gauges are refreshed from the live state on every scrape (``refresh`` callback), so
Prometheus never sees a value older than the scrape itself.

``/metrics`` carries no tenant label, but its gauges give running and waiting requests
per backend and model, and the model names: a model only one tenant may use shows that
tenant's traffic, and names the tenant-filtered ``/v1/models`` hides from others are
there. Any pod that reaches the pod's address reaches the port (every pod in the cluster
without NetworkPolicies), so with ``metrics.bearer_token_file`` set ``/metrics`` wants
``Authorization: Bearer <token>`` and answers anything else with a 401 that names neither
the token sent nor the one wanted, as the control plane's metrics port does. The tokens
are compared as sha256 digests with :func:`hmac.compare_digest`, so the time taken says
nothing about how much of a guess matched, nor about the token's length.

``/healthz`` stays open: it says only that the process answers, and probes (which carry no
token) may use it.

The control plane keeps its own copy of this check (``controlplane.api.observability``,
reading the file in ``controlplane.api.services``); the two are a dozen lines and the
agent must not import the control plane, so each process holds its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from synapse_common import api_error, bearer_token

log = logging.getLogger(__name__)

FIELD = "metrics.bearer_token_file"
TokenFileError = bearer_token.TokenFileError    # an unreadable or empty token file


class _Unauthorized(api_error.ApiError, http_status=401, error_type="authentication_error"):
    pass


def read_token(path: str | None) -> bytes | None:
    """The sha256 of the token in ``path`` (:mod:`synapse_common.bearer_token`), None
    without a path; :class:`TokenFileError` naming the field when unreadable or empty."""
    return bearer_token.read_digest(path, FIELD)


token_matches = bearer_token.matches


def _refusal() -> web.Response:
    error = _Unauthorized("/metrics needs the metrics token: send it as "
                          f"'Authorization: Bearer <token>' ({FIELD})",
                          code="invalid_metrics_token")
    return web.json_response(error.envelope(), status=error.http_status,
                             headers={"WWW-Authenticate": 'Bearer realm="metrics"'})


class MetricsServer:
    """``token_sha256``: what :func:`read_token` returned; None serves ``/metrics`` to
    whoever reaches the port."""

    def __init__(self, registry: CollectorRegistry, refresh: Callable[[], None], host: str,
                 port: int, token_sha256: bytes | None = None) -> None:
        self._registry = registry
        self._refresh = refresh
        self._host = host
        self._port = port
        self._token_sha256 = token_sha256
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def _metrics(self, request: web.Request) -> web.Response:
        wanted = self._token_sha256
        if wanted is not None and not token_matches(wanted,
                                                    request.headers.get("Authorization")):
            return _refusal()
        self._refresh()
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])

    async def stop(self) -> None:
        await self._runner.cleanup()
