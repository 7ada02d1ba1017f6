"""Coalescing: identical cacheable requests in flight at once share one backend call.

Without it, N identical requests that arrive together all miss the cache (nothing is
stored until the first answer completes) and all go to a backend. :class:`CoalescingCache`
wraps the response cache (the same :class:`cache_port.ResponseCache` port, so the
serving path is unchanged): the first request to miss with a given exact key (the
cache's own key: same tenant, model, context and last message) becomes the *leader* and
goes to a backend; the others, the *followers*, wait in ``lookup`` until the leader is
done, then

* are answered from the leader's complete answer as ``hit-exact`` (the answer the cache
  stores, so exactly what a moment later would have been a hit), in the form each one
  asked for, when that answer can serve them (:func:`cache_entry.serves`: e.g. usage due
  but absent is not served);
* or, when the leader failed (an error, a cut stream, an answer that may not be cached)
  or its answer cannot serve them, proceed on their own as the misses they were.

The leader's end is :meth:`CoalescingCache.store` (a complete answer) or
:meth:`CoalescingCache.done` (always called when its request ends; a no-op after
``store``). A follower never waits longer than ``max_wait_s``. Keys live in this process:
followers on other replicas are not coalesced (they meet the stored entry once the
leader completes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.core import cache_entry, cache_port


@dataclasses.dataclass(eq=False, slots=True)
class Flight:
    leader: cache_port.CacheDecision
    answer: asyncio.Future[Mapping[str, Any] | None]
    followers: int = 0


class CoalescingCache:
    def __init__(self, inner: cache_port.ResponseCache, max_wait_s: float = 300.0,
                 on_follow: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self.max_wait_s = max_wait_s
        self._on_follow = on_follow     # called with "hit" or "alone" per follower
        self._flights: dict[str, Flight] = {}

    def in_flight(self) -> int:
        return len(self._flights)

    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        decision = await self.inner.lookup(request)
        key = decision.exact_key
        if decision.status != "miss" or not decision.may_store or not key:
            return decision
        flight = self._flights.get(key)
        if flight is None:
            loop = asyncio.get_running_loop()
            self._flights[key] = Flight(decision, loop.create_future())
            return decision
        return await self._follow(flight, decision, request)

    async def _follow(self, flight: Flight, decision: cache_port.CacheDecision,
                      request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        flight.followers += 1
        answer: Mapping[str, Any] | None = None
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(asyncio.shield(flight.answer), self.max_wait_s)
        form = getattr(answer, "form", None)
        if answer is None or not cache_entry.serves(cache_entry.Entry(answer, form),
                                                    request.body):
            self._count("alone")
            return decision
        self._count("hit")
        hit = cache_port.CacheHit(layer="exact", response=answer, form=form)
        return cache_port.CacheDecision(status="hit-exact", hit=hit, reason="coalesced")

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

    def store(self, decision: cache_port.CacheDecision, response: Mapping[str, Any]) -> None:
        self.inner.store(decision, response)
        self._land(decision, response)

    def done(self, decision: cache_port.CacheDecision) -> None:
        """The request of ``decision`` ended (its followers proceed if it stored nothing)."""
        self._land(decision, None)

    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        return await self.inner.invalidate(tenant=tenant, model=model, everything=everything)

    async def close(self) -> None:
        for flight in self._flights.values():
            if not flight.answer.done():
                flight.answer.set_result(None)
        self._flights.clear()
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else of the wrapped cache (drain, metrics, feedback hooks) as it is.
        return getattr(self.inner, name)


def done(cache: cache_port.ResponseCache, decision: cache_port.CacheDecision) -> None:
    """Tell ``cache`` that the request of ``decision`` ended, if it coalesces."""
    if isinstance(cache, CoalescingCache):
        cache.done(decision)
