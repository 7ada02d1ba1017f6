"""Which backend holds a stored Responses answer (pure).

A Responses call that continues a conversation (``previous_response_id``) can only be
answered by the engine that stored the previous answer (vLLM keeps them in its own
process memory, and only with its store on). So the control plane remembers, for each
answer it relayed, the backend that made it, and routes a continuation there and only
there (retries included): when that backend is gone the engine that is asked answers
404, which is the truth. An id this replica never saw (another replica relayed it, or
this one restarted) is routed like any request.

Bounded: :data:`LIMIT` ids per replica, split equally between the configured tenants,
each tenant's least recently used first out (:mod:`tenant_lru`): one tenant's flood of
answers never unpins another's, whose continuations would otherwise lose their backend.
A pin is kept and looked up under the tenant the id was sealed for.

Worker processes of one pod share their pins (:mod:`shared_routing`): a :attr:`Pins.listener`
is told of every id remembered (with its tenant), and a sibling's come in through
:meth:`Pins.remember`.

Pins are keyed by the *engine's* id and only route: they grant nothing. Whether a caller
may continue an id at all is decided before, statelessly, by the id's tag
(:mod:`response_ids`); :attr:`Pins.seal` holds this process's key for that. A pin is
learnt only from where the engine alone writes its id (never from text a client could
make an engine echo), so a tenant cannot pin another's id elsewhere either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from controlplane.core import response_ids, tenant_lru, types

LIMIT = 100_000     # ids in all, split equally between tenants


class Pins:
    def __init__(self, limit: int = LIMIT, tenants: int = 1) -> None:
        self._by_id: tenant_lru.TenantLRU[str] = tenant_lru.TenantLRU(limit, tenants)
        # (tenant, response id, backend)
        self.listener: Callable[[str, str, str], None] | None = None
        # the key that binds ids to tenants, made from the settings on first use
        self.seal: response_ids.Seal | None = None

    def __len__(self) -> int:
        return len(self._by_id)

    def remember(self, tenant: str, response_id: str, backend: str) -> None:
        """``tenant``'s answer ``response_id`` (the engine's id) was made by ``backend``."""
        self._by_id.put(tenant, response_id, backend)
        if self.listener is not None:
            self.listener(tenant, response_id, backend)

    def backend_of(self, tenant: str, response_id: str) -> str | None:
        return self._by_id.get(tenant, response_id)

    def pin(self, route: types.RouteDecision, tenant: str,
            response_id: str) -> types.RouteDecision:
        """``route`` narrowed to the backend holding ``tenant``'s ``response_id``, when
        known and among the candidates; unchanged otherwise."""
        backend = self.backend_of(tenant, response_id)
        if backend is None:
            return route
        held = tuple(v for v in route.candidates if v.backend.key == backend)
        if not held:
            return route
        return dataclasses.replace(route, candidates=held, reason="pinned: previous_response_id")
