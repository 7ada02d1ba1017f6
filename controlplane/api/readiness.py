"""``GET /ready``: can this replica serve?

Ready means the config loaded (the process would not run otherwise), HTTP is up (it is
answering) and the registry is **synced**: the static upstreams were probed once (until
then their health is a guess), and either a backend is routable, an agent has reported,
or ``registry.sync_grace_s`` passed since start (agents reconnecting to a new replica
need a moment; a fleet with none must not keep the replica out forever).
From SIGTERM on it is 503 ``shutting down`` (:mod:`controlplane.main`: the process still
serves for ``http.drain_delay_s`` so that endpoints are removed before its listener closes).

Whether a backend is routable right now is reported — in the body (``backends_ready``,
``routable``, and ``warning: no routable backend``) and in the ``synapse_ready{condition}``
gauge — but it is not a reason to leave the Service: during a fleet-wide outage every
replica would leave it, and clients would get refused connections instead of the 503
envelope that says "try again shortly". ``registry.ready_requires_backend: true`` brings
back the old rule (503 whenever no backend is routable).

While the semantic cache's store is still opening (``controlplane.cache_wiring.build_l2``
starts it at start-up, in a thread), ``/ready`` is 503 ``cache opening`` (warning of no
routable backend as a ready answer does), for at most
:data:`L2_OPEN_WAIT_S` from start: the first lookups would otherwise spend their budget on
the open and be served without the cache, but a Milvus that does not answer must not keep
the replica out of the Service (past the wait it serves without L2, as it would anyway).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from controlplane.api import services as services_mod


@dataclasses.dataclass
class State:
    started: float
    probed: bool = False            # the static upstreams' first probe round is done
    stopping: bool = False          # SIGTERM came: /ready answers 503 (controlplane.main)
    cut: bool = False               # the shutdown grace ended: what runs is being cut

    def static_probed(self) -> None:
        self.probed = True


def state(svc: services_mod.Services) -> State:
    """This replica's readiness state (created at first use, from the app's start-up)."""
    if svc.readiness is None:
        svc.readiness = State(svc.clock(), probed=not svc.settings.upstreams)
    return svc.readiness


# What a request the shutdown grace could not wait for is told: a stream in its error
# event, a request not yet answered in a 503 (code SHUTTING_DOWN_CODE).
SHUTTING_DOWN = "the server is shutting down; retry the request"
SHUTTING_DOWN_CODE = "server_shutting_down"


def cut(svc: services_mod.Services) -> bool:
    """Whether the shutdown grace is over: a cancelled handler was cut by the server,
    not abandoned by its client."""
    return svc.readiness is not None and svc.readiness.cut


# How long /ready waits for the semantic cache's store to open (see the module docstring).
L2_OPEN_WAIT_S = 60.0


def l2_opening(svc: services_mod.Services) -> bool:
    """Whether the semantic cache's store is still opening, within :data:`L2_OPEN_WAIT_S`
    of start."""
    if svc.clock() - state(svc).started >= L2_OPEN_WAIT_S:
        return False
    tiered = services_mod.tiered_cache(svc.cache)
    # the Milvus store opens in the background; other stores (tests' fakes) have no
    # warm-up to wait for
    warming = getattr(getattr(getattr(tiered, "l2", None), "store", None), "warming", None)
    return bool(callable(warming) and warming())


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
    if state(svc).stopping:     # out of the Service before the listener closes
        return 503, {"status": "not ready", "reason": "shutting down", "backends_ready": n}
    if l2_opening(svc):
        return 503, {"status": "not ready", "reason": "cache opening", "backends_ready": n,
                     **({"warning": "no routable backend"} if n == 0 else {})}
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
