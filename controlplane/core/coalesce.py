"""Coalescing: identical cacheable requests in flight at once share one backend call.

Without it, N identical requests that arrive together all miss the cache (nothing is
stored until the first answer completes) and all go to a backend. The serving path looks
the cache up through :meth:`Coalescer.lookup` and hands complete answers to the cache
through :meth:`Coalescer.store`: the first request to miss with a given exact key (the
cache's own key: same tenant, model, context and last message) becomes the *leader* and
goes to a backend; the others, the *followers*, wait in ``lookup`` until the leader is
done, then

* are answered from the leader's complete answer as ``hit-exact`` (the answer the cache
  stores, so exactly what a moment later would have been a hit), in the form each one
  asked for, when that answer can serve them (:func:`cache_entry.serves`: e.g. usage due
  but absent is not served);
* or, when the leader failed (an error, a cut stream, an answer that may not be cached)
  or its answer cannot serve them, proceed on their own as the misses they were.

The leader's end is :meth:`Coalescer.store` (a complete answer) or :meth:`Coalescer.done`
(always called when its request ends; a no-op after ``store``). A follower never waits
longer than ``max_wait_s``. The cache writes its entries off the hot path, so a landed
answer is kept for ``grace_s`` more, or until the cache answers that key itself: a request
that arrives between the leader's end and the entry's write is answered from it too,
instead of leading a second backend call. An invalidation of the cache drops every landed
copy (:meth:`Coalescer.forget_landed` listens to the cache's invalidations, this
process's and its sibling workers'). Landed copies are kept per tenant, each tenant with
its share of ``LANDED_MAX`` (``core.tenant_lru``), so one tenant's burst never pushes out
another's. Keys live in this process: followers on other replicas are not coalesced (they
meet the stored entry once the leader completes). The coalescer sits beside the cache
rather than wrapping it, so whatever wraps the cache (feedback) still sees its own type;
a follower's hit names the leader's entry (its exact key) and is told to ``on_served``, so
feedback on a follower's request id acts on that entry like feedback on any exact hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.core import cache_entry, cache_port, tenant_lru
from synapse_common import clock as clocks

LANDED_MAX = 1024           # landed answers kept for their grace period at most, in all


@dataclasses.dataclass(eq=False, slots=True)
class Flight:
    leader: cache_port.CacheDecision
    answer: asyncio.Future[Mapping[str, Any] | None]
    tenant: str
    followers: int = 0


class Coalescer:
    def __init__(self, max_wait_s: float = 300.0,
                 on_follow: Callable[[str], None] | None = None, grace_s: float = 5.0,
                 clock: clocks.Clock = clocks.monotonic, tenants: int = 1,
                 on_served: Callable[[cache_port.CacheRequest, cache_port.CacheHit], None]
                 | None = None) -> None:
        self.max_wait_s = max_wait_s
        self.grace_s = grace_s
        self._clock = clock
        self._on_follow = on_follow     # called with "hit" or "alone" per follower
        self._on_served = on_served     # called with each follower's request and hit
        self._flights: dict[str, Flight] = {}
        # per tenant: key -> (answer, until)
        self._landed: tenant_lru.TenantLRU[tuple[Mapping[str, Any], float]] = \
            tenant_lru.TenantLRU(LANDED_MAX, tenants)

    def in_flight(self) -> int:
        return len(self._flights)

    async def lookup(self, cache: cache_port.ResponseCache,
                     request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        """``cache.lookup``, joined to an identical request in flight when it misses."""
        decision = await cache.lookup(request)
        key = decision.exact_key
        if decision.status != "miss" or not decision.may_store or not key:
            if decision.hit is not None:
                # The cache has the entry now: from here on it, not a landed copy, answers
                # (so an eviction or invalidation of it holds at once).
                self._landed.pop(request.tenant, key)
            return decision
        landed = self._landed.get(request.tenant, key)
        if landed is not None:
            if landed[1] > self._clock():
                return self._answer(landed[0], decision, request)
            self._landed.pop(request.tenant, key)
        flight = self._flights.get(key)
        if flight is None:
            loop = asyncio.get_running_loop()
            self._flights[key] = Flight(decision, loop.create_future(), request.tenant)
            return decision
        flight.followers += 1
        answer: Mapping[str, Any] | None = None
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(asyncio.shield(flight.answer), self.max_wait_s)
        return self._answer(answer, decision, request)

    def _answer(self, answer: Mapping[str, Any] | None, decision: cache_port.CacheDecision,
                request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        """A follower's decision: a hit from the leader's answer when it serves it."""
        form = getattr(answer, "form", None)
        if answer is None or not cache_entry.serves(cache_entry.Entry(answer, form),
                                                    request.body):
            self._count("alone")
            return decision
        self._count("hit")
        hit = cache_port.CacheHit(layer="exact", response=answer, form=form,
                                  source=cache_port.HitSource(decision.exact_key, "", ""))
        if self._on_served is not None:
            self._on_served(request, hit)
        return cache_port.CacheDecision(status="hit-exact", hit=hit, reason="coalesced",
                                        work_s=decision.work_s)

    def _count(self, outcome: str) -> None:
        if self._on_follow is not None:
            self._on_follow(outcome)

    def _land(self, decision: cache_port.CacheDecision,
              answer: Mapping[str, Any] | None) -> None:
        flight = self._flights.get(decision.exact_key) if decision.exact_key else None
        if flight is None or flight.leader is not decision:
            return
        del self._flights[decision.exact_key]
        if not flight.answer.done():
            flight.answer.set_result(answer)
        if answer is not None and self.grace_s > 0:
            self._landed.put(flight.tenant, decision.exact_key,
                             (answer, self._clock() + self.grace_s))

    def store(self, cache: cache_port.ResponseCache, decision: cache_port.CacheDecision,
              response: Mapping[str, Any]) -> None:
        """``cache.store`` of a complete answer, which also answers the followers."""
        cache.store(decision, response)
        self._land(decision, response)

    def done(self, decision: cache_port.CacheDecision) -> None:
        """The request of ``decision`` ended (its followers proceed if it stored nothing)."""
        self._land(decision, None)

    def forget_landed(self, tenant: str | None = None, model: str | None = None) -> None:
        """Drop the landed copies of ``tenant`` (None: of every tenant): the cache was
        invalidated, here or on a sibling worker, or a wrong verdict evicted one of its
        entries, and nothing answers from before. All of a tenant's, whatever ``model``:
        they are seconds from being the cache's own entries anyway; never another
        tenant's, whose verdicts must not cost the others anything."""
        if tenant is None:
            self._landed.clear()
            return
        for _, key, _ in list(self._landed.items(tenant)):
            self._landed.pop(tenant, key)

    def close(self) -> None:
        """Release every follower (they proceed on their own)."""
        for flight in self._flights.values():
            if not flight.answer.done():
                flight.answer.set_result(None)
        self._flights.clear()
        self._landed.clear()
