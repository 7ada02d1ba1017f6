"""``GET /ready``: can this replica serve?

Ready means the config loaded (the process would not run otherwise), HTTP is up (it is
answering) and the registry is **synced**: the static upstreams were probed once (until
then their health is a guess), and either a backend is routable, an agent has reported,
or ``registry.sync_grace_s`` passed since start (agents reconnecting to a new replica
need a moment; a fleet with none must not keep the replica out forever).

Whether a backend is routable right now is reported — in the body (``backends_ready``,
``routable``, and ``warning: no routable backend``) and in the ``synapse_ready{condition}``
gauge — but it is not a reason to leave the Service: during a fleet-wide outage every
replica would leave it, and clients would get refused connections instead of the 503
envelope that says "try again shortly". ``registry.ready_requires_backend: true`` brings
back the old rule (503 whenever no backend is routable).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from controlplane.api import services as services_mod


@dataclasses.dataclass
class State:
    started: float
    probed: bool = False            # the static upstreams' first probe round is done

    def static_probed(self) -> None:
        self.probed = True


def state(svc: services_mod.Services) -> State:
    """This replica's readiness state (created at first use, from the app's start-up)."""
    if svc.readiness is None:
        svc.readiness = State(svc.clock(), probed=not svc.settings.upstreams)
    return svc.readiness


def routable_count(svc: services_mod.Services) -> int:
    return sum(1 for _, why in svc.registry.all_backends() if not why)


def conditions(svc: services_mod.Services) -> dict[str, bool]:
    st = state(svc)
    routable = routable_count(svc) > 0
    waited = svc.clock() - st.started >= svc.settings.registry.sync_grace_s
    reported = any(n.backends or n.report is not None for n in svc.registry.nodes())
    synced = st.probed and (routable or reported or waited)
    return {"config_loaded": True, "registry_synced": synced, "routable_backend": routable}


def check(svc: services_mod.Services) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/ready``."""
    n = routable_count(svc)
    if svc.settings.registry.ready_requires_backend:      # the old rule
        if n == 0:
            return 503, {"status": "not ready", "reason": "no routable backend",
                         "backends_ready": 0}
        return 200, {"status": "ready", "backends_ready": n}
    met = conditions(svc)
    body: dict[str, Any] = {"status": "ready", "backends_ready": n, "routable": n > 0,
                            "registry_synced": met["registry_synced"]}
    if n == 0:
        body["warning"] = "no routable backend"
    if not met["registry_synced"]:
        return 503, {**body, "status": "not ready", "reason": "registry syncing"}
    return 200, body


def refresh_gauge(svc: services_mod.Services) -> None:
    """``synapse_ready{condition}`` (1 = met), set when ``/metrics`` is scraped."""
    for condition, met in conditions(svc).items():
        svc.metrics.readiness.labels(condition).set(1 if met else 0)
