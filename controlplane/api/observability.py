"""``GET /metrics``: the Prometheus exposition, refreshed gauges first.

It lists every tenant's name and traffic (requests by model, status and route, tokens),
so no tenant may read it. Who may, by where it is served (:func:`guard`):

* **a port of its own** (``metrics.port``): whoever reaches that port, unless
  ``metrics.bearer_token_file`` is set. The API port then has no ``/metrics`` (404). This
  is the deployed default (the Helm chart, the kustomize overlays, the production
  example), with ``metrics.bearer_token_file`` set too: the port is one the API Service
  and the Ingress do not expose, a ServiceMonitor scrapes it presenting the token, and
  the NetworkPolicies, when on, admit only the monitoring namespace.
* **the API port** (``metrics.port`` unset, the plain process's default): the port every
  tenant reaches, so with tenant keys (``auth.enabled``) it needs the admin key, as
  ``/api/v1/stats`` (which shows the same usage) does: 401 without a key or with an
  unknown one, 403 with a tenant's key. With ``auth.enabled`` off it stays open: every
  caller is then the one anonymous tenant, so there is no other tenant to reveal, and an
  embedded ``make up`` on localhost keeps its key-less scrape.
* ``metrics.bearer_token_file`` set: that token and nothing else, on either port
  (``Authorization: Bearer <token>``, compared as a sha256 like API keys).

Why not a metrics port by default in the process too: a fixed default port collides
between processes on one host (tests, several control planes) and a second listener is
one more thing ``make up`` would have to know; a deployment, which the chart and the
overlays describe, is where a separate port costs nothing. An operator who scrapes the
API port of a control plane with tenant keys gets a 401 whose message names the way out
(``metrics.port``, or the admin key / a metrics token for the scraper).

With ``Services.worker_metrics_sockets`` set (a process of a pod with ``http.workers``
above 1), it answers the pod's metrics: its own merged with those of the pod's other
processes, each of which serves its own on a private unix socket
(:func:`serve_worker_metrics`); :mod:`controlplane.api.worker_metrics` holds the merge
rule. The guard applies to the pod's answer as to a single process's; a socket needs
none (its file is its owner's only, 0600, in the directory the pod keeps for them).
"""

from __future__ import annotations

import os
import pathlib
from typing import Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import config, errors
from controlplane.api import context, fleet_stats, readiness, worker_metrics
from controlplane.api import services as services_mod
from synapse_common import bearer_token

_POD: web.AppKey[worker_metrics.PodMetrics] = web.AppKey("pod_metrics",
                                                       worker_metrics.PodMetrics)
_ON_API_PORT: web.AppKey[bool] = web.AppKey("metrics_on_api_port", bool)

Guard = Literal["token", "admin", "open"]

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


def guard(settings: config.ControlPlaneSettings, on_api_port: bool) -> Guard:
    """What ``/metrics`` asks of a caller (the module docstring says why)."""
    if settings.metrics.bearer_token_file is not None:
        return "token"
    if on_api_port and settings.auth.enabled:
        return "admin"
    return "open"


def _check_token(svc: services_mod.Services, authorization: str | None) -> None:
    wanted = svc.metrics_token_sha256
    if wanted is None or not bearer_token.matches(wanted, authorization):
        raise errors.Unauthorized("/metrics needs the metrics token: send it as "
                                  "'Authorization: Bearer <token>' (metrics.bearer_token_file)",
                                  code="invalid_metrics_token")


def _check_admin(svc: services_mod.Services, authorization: str | None) -> None:
    try:
        svc.tenants.authenticate_admin(authorization)
    except (errors.Unauthorized, errors.Forbidden) as exc:
        raise exc.reworded(f"{exc.message}: /metrics on the API port lists every tenant's "
                           "traffic, so it needs the admin key; for a Prometheus scrape, "
                           "serve it on a port of its own (metrics.port)") from None


def install(app: web.Application, *, on_api_port: bool) -> None:
    """``GET /metrics`` on ``app``: this process's metrics, or the pod's once
    ``Services.worker_metrics_sockets`` is set (it may be after the app is built).
    ``on_api_port``: ``app`` is the API every tenant reaches (see :func:`guard`)."""
    app[_POD] = worker_metrics.PodMetrics()
    app[_ON_API_PORT] = on_api_port
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[context.SERVICES]
    authorization = request.headers.get("Authorization")
    match guard(svc.settings, request.app[_ON_API_PORT]):
        case "token":
            _check_token(svc, authorization)
        case "admin":
            _check_admin(svc, authorization)
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
    """Serve this worker's own ``/metrics`` (and its own ``/stats``: ``api.fleet_stats``)
    on the unix socket ``path`` (mode 0600) for the pod's other processes to merge; the
    caller cleans the returned runner up."""
    app = web.Application()
    app[context.SERVICES] = svc
    app.router.add_get("/metrics", _own)
    app.router.add_get(fleet_stats.OWN_ROUTE, fleet_stats.own)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, 0o600)
    except BaseException:
        await runner.cleanup()
        raise
    return runner
