"""``GET /metrics``: the Prometheus exposition, refreshed gauges first.

It lists every tenant's name and traffic, so an operator can keep it from tenants two
ways, as a Prometheus ``ServiceMonitor`` expects: ``metrics.port`` serves it on a port of
its own (and not on the API port), and ``metrics.bearer_token_file`` makes it need
``Authorization: Bearer <token>`` (401 in the OpenAI envelope otherwise; the token is
compared as a sha256, like API keys). Without either it stays open on the API port, as
before.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import errors
from controlplane.api import context, readiness
from controlplane.api import services as services_mod
from controlplane.core import tenants

_STATES = ("ready", "starting", "unhealthy", "draining", "cordoned", "down", "stopped",
           "crashloop", "failed", "unspecified")


def _state_label(why: str) -> str:
    """The ``synapse_backends`` state of a backend from the registry's reason."""
    if not why:
        return "ready"
    kind, _, state = why.partition(" ")
    if kind in ("node", "backend") and state in _STATES:
        return state
    return "unhealthy"  # a static upstream whose probe failed


def refresh_gauges(svc: services_mod.Services) -> None:
    m = svc.metrics
    counts = dict.fromkeys(_STATES, 0)
    for _, why in svc.registry.all_backends():
        counts[_state_label(why)] += 1
    for state, count in counts.items():
        m.backends.labels(state).set(count)
    nodes = svc.registry.nodes()
    for status in ("ready", "cordoned", "draining", "down"):
        m.nodes.labels(status).set(sum(1 for node in nodes if node.status == status))
    m.node_report_age.clear()
    for n in nodes:
        m.node_report_age.labels(n.info.name).set(n.last_report_age_s)
    m.backend_inflight.clear()
    for key, load in svc.ledger.snapshot().items():
        m.backend_inflight.labels(key).set(load.in_flight)
    readiness.refresh_gauge(svc)


def _check_token(svc: services_mod.Services, authorization: str | None) -> None:
    wanted = svc.metrics_token_sha256
    if wanted is None:
        return
    token = tenants.TenantTable.bearer(authorization)
    if token is None or not hmac.compare_digest(tenants.sha256_hex(token), wanted):
        raise errors.Unauthorized("/metrics needs the metrics token: send it as "
                                  "'Authorization: Bearer <token>' (metrics.bearer_token_file)",
                                  code="invalid_metrics_token")


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    _check_token(svc, request.headers.get("Authorization"))
    refresh_gauges(svc)
    body = generate_latest(svc.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
