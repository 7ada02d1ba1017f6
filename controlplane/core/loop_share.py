"""Each tenant's fair share of a serving process's event loop (pure; injected clock).

A serving process runs every tenant's requests on one event loop, so the synchronous work
of one request (parsing its body, tokenizing its prompt, hashing its blocks) is time
every other request waits. Rate limits count requests and tokens, not that CPU, and a
body the size limit admits can cost a hundred milliseconds of it: one tenant sending
such bodies back to back held the loop nearly all the time, and every other tenant's
requests waited behind them.

So the serving path measures that work per request (:meth:`LoopShare.charge`) and asks,
before it reads a request's body, how long its tenant must wait (:meth:`wait_s`). A
tenant whose requests are cheap (under :data:`CHEAP_S`) never waits and costs a clock
read and a dict store per request. A tenant whose requests are expensive gets turns: each
of its requests reserves its estimated cost (a moving average of what its requests
measured) divided by its share of the loop — one over the tenants active in the last
``window_s`` — so its requests start spaced out and together use about its share. Alone
(no other tenant active) it has the whole loop and nothing waits: the share only takes
from a tenant what another one is asking for. A wait longer than ``max_wait_s`` is not
queued: the request is refused (the caller's 429) without reserving a turn.
"""

from __future__ import annotations

from synapse_common import clock as clocks

CHEAP_S = 0.002         # a request's measured work below this is not rationed
AVERAGE_WEIGHT = 0.3    # of the latest measure in a tenant's moving average cost


class LoopShare:
    def __init__(self, *, window_s: float = 2.0, burst_s: float = 0.05,
                 max_wait_s: float = 10.0, clock: clocks.Clock = clocks.monotonic) -> None:
        self.window_s = window_s
        self.burst_s = burst_s
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._seen: dict[str, float] = {}       # tenant -> its latest request's start
        self._cost: dict[str, float] = {}       # expensive tenants -> their average cost
        self._free_at: dict[str, float] = {}    # expensive tenants -> end of their turns

    def wait_s(self, tenant: str) -> float | None:
        """Seconds ``tenant``'s new request waits for its turn (0.0: none), its turn then
        reserved; None when that would be over ``max_wait_s`` (refuse it, reserve nothing)."""
        now = self._clock()
        self._seen[tenant] = now
        cost = self._cost.get(tenant)
        if cost is None:
            return 0.0
        others = sum(1 for name, at in self._seen.items()
                     if name != tenant and now - at < self.window_s)
        if not others:
            self._free_at.pop(tenant, None)
            return 0.0
        free_at = max(now, self._free_at.get(tenant, now))
        wait = max(0.0, free_at - self.burst_s - now)
        if wait > self.max_wait_s:
            return None
        self._free_at[tenant] = free_at + cost * (1 + others)
        return wait

    def charge(self, tenant: str, seconds: float) -> None:
        """One of ``tenant``'s requests took ``seconds`` of the loop's synchronous work."""
        cost = self._cost.get(tenant)
        if cost is None:
            if seconds >= CHEAP_S:
                self._cost[tenant] = seconds
            return
        cost += (seconds - cost) * AVERAGE_WEIGHT
        if cost < CHEAP_S:
            del self._cost[tenant]
            self._free_at.pop(tenant, None)
        else:
            self._cost[tenant] = cost

    def rationed(self) -> list[str]:
        """The tenants whose requests currently take turns (expensive ones)."""
        return sorted(self._cost)
