"""Static upstreams at run time: their probes and metrics, by kind.

Builds one :class:`~controlplane.adapters.prober.Target` per configured upstream from
its kind (:mod:`controlplane.core.upstream_kinds`): the probe path, whether the key goes
with it, the statuses that count as healthy, the interval (the upstream's own, else
``registry.upstream_probe_interval_s``, never below the kind's minimum — a hosted API is
asked at most once a minute unless configured otherwise) and, for engines with metrics,
the ``/metrics`` URL whose text becomes the backend's load in the registry. The first
round of probes marks the registry's static part as synced for ``/ready``.

A kind-less upstream also has its ``/openapi.json`` read once it answers a probe, and
again whenever it comes back after being unhealthy (unsalted until that read answers
for certain), for
:class:`controlplane.api.salt_learning.Learner`: a server whose chat or completions
request schema has ``cache_salt`` (vLLM, the simulator) is salted per tenant from then
on; otherwise, when tenants share it, the warning of
:func:`controlplane.core.cache_salt.warning` is logged (by the pod's primary).
"""

from __future__ import annotations

from controlplane import config
from controlplane.adapters import prober
from controlplane.api import readiness, salt_learning
from controlplane.api import services as services_mod
from controlplane.core import types, upstream_kinds, upstream_metrics


def target(u: config.UpstreamSettings, backend: types.BackendState,
           default_interval_s: float) -> prober.Target:
    kind = upstream_kinds.get(u.kind)
    interval = u.probe_interval_s or max(default_interval_s,
                                         kind.min_probe_interval_s if kind else 0.0)
    path = kind.health_path if kind else u.health_path
    with_key = kind is None or kind.probe_with_key
    auth = upstream_kinds.auth_headers(backend.api_key)
    return prober.Target(
        key=backend.key, url=backend.url + path, headers=auth if with_key else {},
        interval_s=interval, timeout_s=max(1.0, min(5.0, interval / 2)),
        ok_statuses=kind.healthy_statuses if kind else frozenset(),
        metrics_url=backend.url + "/metrics" if kind and kind.metrics else None,
        metrics_headers=auth,      # llama-server --api-key guards /metrics too
        document_url=backend.url + "/openapi.json" if kind is None else None)


def targets(svc: services_mod.Services) -> list[prober.Target]:
    backends = {b.key: b for b in svc.registry.static_backends()}
    interval = svc.settings.registry.upstream_probe_interval_s
    return [target(u, backends[f"static/{u.name}"], interval) for u in svc.settings.upstreams]


def build(svc: services_mod.Services,
          learner: salt_learning.Learner | None = None) -> prober.Prober:
    """The prober of ``svc``'s upstreams; kind-less ones' documents go to ``learner``
    (a new one when None)."""
    kinds = {f"static/{u.name}": upstream_kinds.get(u.kind) for u in svc.settings.upstreams}

    def on_metrics(key: str, text: str | None) -> None:
        kind = kinds.get(key)
        if kind is None or kind.metrics is None:
            return
        load = (upstream_metrics.parse(text, kind.metrics) if text is not None
                else types.EngineLoad(ok=False))
        svc.registry.set_static_load(key, load)

    learner = learner or salt_learning.Learner(svc)
    return prober.Prober(svc.upstream, targets(svc), svc.registry.set_static_health,
                         on_metrics=on_metrics, on_document=learner.learnt,
                         on_due=learner.unread_static,
                         on_round=lambda: readiness.state(svc).static_probed())
