"""Each tenant's fair share of a serving process's event loop (pure; injected clock).

A serving process runs every tenant's requests on one event loop, so the synchronous work
of one request (parsing its body, tokenizing its prompt, hashing its blocks) is time
every other request waits. Rate limits count requests and tokens, not that CPU, and a
body the size limit admits can cost a hundred milliseconds of it: one tenant sending
such bodies back to back held the loop nearly all the time, and every other tenant's
requests waited behind them.

So the serving path measures that work per request (:meth:`LoopShare.charge`) and asks,
before it reads a request's body, how long its tenant must wait (:meth:`wait_s`). A
tenant whose requests are cheap (under :data:`CHEAP_S` on average) never waits and costs a
dict lookup per request. A tenant whose requests are expensive gets turns: each of its
requests reserves its estimated cost (a moving average of what its requests measured)
times the number of tenants, so its requests start spaced out and together use at most
its share of the loop, one over the configured tenants. The share is fixed, not
one over the tenants active now: a tenant whose turns came faster when the others were
idle would learn from its own waits whether anyone else was being served. A wait longer
than ``max_wait_s``, or one more than ``max_waiting`` requests of the tenant already wait,
is not queued: the request is refused (the caller's 429) without reserving a turn (a
waiting request may hold its body in memory: the waits are bounded in number, not only in
time).
"""

from __future__ import annotations

from synapse_common import clock as clocks

CHEAP_S = 0.002         # a request's measured work below this is not rationed
AVERAGE_WEIGHT = 0.3    # of the latest measure in a tenant's moving average cost


class LoopShare:
    def __init__(self, tenants: int = 1, *, burst_s: float = 0.05, max_wait_s: float = 10.0,
                 max_waiting: int = 16, clock: clocks.Clock = clocks.monotonic) -> None:
        self.tenants = max(1, tenants)
        self.burst_s = burst_s
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self._clock = clock
        self._waiting: dict[str, int] = {}      # tenant -> its requests waiting now
        self._cost: dict[str, float] = {}       # expensive tenants -> their average cost
        self._free_at: dict[str, float] = {}    # expensive tenants -> end of their turns

    def wait_s(self, tenant: str) -> float | None:
        """Seconds ``tenant``'s new request waits for its turn (0.0: none), its turn then
        reserved; None when that would be over ``max_wait_s`` or ``max_waiting`` of its
        requests wait already (refuse it, reserve nothing). A positive wait must be
        followed by :meth:`waited` when it ends, however it ends."""
        cost = self._cost.get(tenant)
        if cost is None:
            return 0.0
        now = self._clock()
        free_at = max(now, self._free_at.get(tenant, now))
        wait = max(0.0, free_at - self.burst_s - now)
        if wait > self.max_wait_s:
            return None
        if wait > 0:
            waiting = self._waiting.get(tenant, 0)
            if waiting >= self.max_waiting:
                return None
            self._waiting[tenant] = waiting + 1
        self._free_at[tenant] = free_at + cost * self.tenants
        return wait

    def waited(self, tenant: str) -> None:
        """One of ``tenant``'s requests that :meth:`wait_s` made wait has stopped waiting."""
        waiting = self._waiting.get(tenant, 0) - 1
        if waiting > 0:
            self._waiting[tenant] = waiting
        else:
            self._waiting.pop(tenant, None)

    def charge(self, tenant: str, seconds: float) -> None:
        """One of ``tenant``'s requests took ``seconds`` of the loop's synchronous work."""
        cost = self._cost.get(tenant)
        if cost is None:
            if seconds >= CHEAP_S and self.tenants > 1:
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
