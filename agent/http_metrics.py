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

Connections: whoever reaches the port could hold connections open for ever, each with
a request head it never finishes. A connection gets :data:`HEAD_TIMEOUT_S` from its
opening, or from the first byte of a next request, to deliver a whole request head, and
is closed after that; at most :data:`MAX_CONNECTIONS` are open, and one more closes the
connection that has been between requests longest (idle, or sending a head), or is
refused when every connection is being answered. This is the control plane's rule for
its API port (``controlplane.api.server``) kept small: a scraper and probes are the
port's only callers, and a scrape's head arrives in one packet.

The control plane keeps its own copy of this check (``controlplane.api.observability``,
reading the file in ``controlplane.api.services``); the two are a dozen lines and the
agent must not import the control plane, so each process holds its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol, web_server
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from synapse_common import api_error, bearer_token

log = logging.getLogger(__name__)

FIELD = "metrics.bearer_token_file"
HEAD_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 64
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


class _Protocol(web_protocol.RequestHandler):
    """aiohttp's connection, closed when a request head takes over ``head_timeout_s``."""

    def __init__(self, manager: web_server.Server, *, head_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_seen = 0
        self.between_since = self._loop.time()   # when it last began to wait for a head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._heads_seen:     # a request head was parsed
            self._heads_seen = self._request_count
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif data and self.between_requests():
            self._arm()

    def between_requests(self) -> bool:
        """Idle or receiving a head: nothing of it is being answered."""
        return (self.transport is not None and not self._request_in_progress
                and not self._messages)

    def _arm(self) -> None:
        if self._head_timer is None:
            if self._heads_seen:
                self.between_since = self._loop.time()
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        self._head_timer = None
        if self._request_count == self._heads_seen and not self._request_in_progress:
            log.debug("closing a metrics connection whose request head took over %gs",
                      self._head_timeout_s)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class _Server(web_server.Server):
    """aiohttp's server with :class:`_Protocol` connections, at most
    :data:`MAX_CONNECTIONS`."""

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # any protocol
        if len(self._connections) >= MAX_CONNECTIONS and not self._make_room():
            log.debug("refusing a metrics connection: %d open, all being answered",
                      len(self._connections))
            return _Refused()
        return _Protocol(self, loop=self._loop, head_timeout_s=HEAD_TIMEOUT_S, **self._kwargs)

    def _make_room(self) -> bool:
        """Close the connection between requests (idle or sending a head) whose wait
        began first; False when there is none."""
        waiting = [c for c in self._connections
                   if isinstance(c, _Protocol) and c.between_requests()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c.between_since).force_close()
        return True


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Runner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


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
        self._runner = _Runner(app, access_log=None)
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
