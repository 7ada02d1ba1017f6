"""``GET /metrics``: the Prometheus exposition, refreshed gauges first.

It lists every tenant's name and traffic, so an operator can keep it from tenants two
ways, as a Prometheus ``ServiceMonitor`` expects: ``metrics.port`` serves it on a port of
its own (and not on the API port), and ``metrics.bearer_token_file`` makes it need
``Authorization: Bearer <token>`` (401 in the OpenAI envelope otherwise; the token is
compared as a sha256, like API keys). Without either it stays open on the API port, as
before.

With ``Services.worker_metrics_sockets`` set (a process of a pod with ``http.workers``
above 1), it answers the pod's metrics: its own merged with those of the pod's other
processes, each of which serves its own on a private unix socket
(:func:`serve_worker_metrics`); :mod:`controlplane.api.worker_metrics` holds the merge
rule. The token guards the pod's answer as it guards a single process's; a socket needs
none (its file is its owner's only, 0600, in the directory the pod keeps for them).
"""

from __future__ import annotations

import hmac
import os
import pathlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import errors
from controlplane.api import context, readiness, worker_metrics
from controlplane.api import services as services_mod
from controlplane.core import tenants

_POD: web.AppKey[worker_metrics.PodMetrics] = web.AppKey("pod_metrics",
                                                       worker_metrics.PodMetrics)

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


def install(app: web.Application) -> None:
    """``GET /metrics`` on ``app``: this process's metrics, or the pod's once
    ``Services.worker_metrics_sockets`` is set (it may be after the app is built)."""
    app[_POD] = worker_metrics.PodMetrics()
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    _check_token(svc, request.headers.get("Authorization"))
    refresh_gauges(svc)
    if svc.worker_metrics_sockets:
        body = await request.app[_POD].exposition(svc.metrics, svc.worker_metrics_sockets)
    else:
        body = generate_latest(svc.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _own(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    refresh_gauges(svc)
    return web.Response(body=generate_latest(svc.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_worker_metrics(svc: services_mod.Services,
                               path: pathlib.Path) -> web.AppRunner:
    """Serve this worker's own ``/metrics`` on the unix socket ``path`` (mode 0600) for
    its primary to merge; the caller cleans the returned runner up."""
    app = web.Application()
    app[context.SERVICES] = svc
    app.router.add_get("/metrics", _own)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, 0o600)
    except BaseException:
        await runner.cleanup()
        raise
    return runner
