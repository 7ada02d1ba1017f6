"""Which backend holds a stored Responses answer (pure).

A Responses call that continues a conversation (``previous_response_id``) can only be
answered by the engine that stored the previous answer (vLLM keeps them in its own
process memory, and only with its store on). So the control plane remembers, for each
answer it relayed, the backend that made it, and routes a continuation there and only
there (retries included): when that backend is gone the engine that is asked answers
404, which is the truth. An id this replica never saw (another replica relayed it, or
this one restarted) is routed like any request.

Bounded: the newest :data:`LIMIT` ids per replica, least recently used first out.

Worker processes of one pod share their pins (:mod:`shared_routing`): a :attr:`Pins.listener`
is told of every id remembered, and a sibling's come in through :meth:`Pins.remember`.

Pins are keyed by the *engine's* id and only route: they grant nothing. Whether a caller
may continue an id at all is decided before, statelessly, by the id's tag
(:mod:`response_ids`); :attr:`Pins.seal` holds this process's key for that. A pin is
learnt only from where the engine alone writes its id (never from text a client could
make an engine echo), so a tenant cannot pin another's id elsewhere either.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

from controlplane.core import response_ids, types

LIMIT = 100_000


class Pins:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._by_id: OrderedDict[str, str] = OrderedDict()
        self.listener: Callable[[str, str], None] | None = None    # (response id, backend)
        # the key that binds ids to tenants, made from the settings on first use
        self.seal: response_ids.Seal | None = None

    def remember(self, response_id: str, backend: str) -> None:
        self._by_id[response_id] = backend
        self._by_id.move_to_end(response_id)
        while len(self._by_id) > self._limit:
            self._by_id.popitem(last=False)
        if self.listener is not None:
            self.listener(response_id, backend)

    def backend_of(self, response_id: str) -> str | None:
        backend = self._by_id.get(response_id)
        if backend is not None:
            self._by_id.move_to_end(response_id)
        return backend

    def pin(self, route: types.RouteDecision, response_id: str) -> types.RouteDecision:
        """``route`` narrowed to the backend holding ``response_id``, when known and among
        the candidates; unchanged otherwise."""
        backend = self.backend_of(response_id)
        if backend is None:
            return route
        held = tuple(v for v in route.candidates if v.backend.key == backend)
        if not held:
            return route
        return dataclasses.replace(route, candidates=held, reason="pinned: previous_response_id")
