"""Each tenant's fair share of a serving process's event loop (pure; injected clock).

A serving process runs every tenant's requests on one event loop, so the synchronous work
of one request (parsing its body, deriving its cache keys, tokenizing its prompt, hashing
its blocks) is time every other request waits. Rate limits count requests and tokens, not
that CPU, and a body the size limit admits can cost a hundred milliseconds of it: one
tenant sending such bodies back to back held the loop nearly all the time, and every
other tenant's requests waited behind them.

So the serving path measures that work per request (:meth:`LoopShare.charge`: a parse
as soon as it is done, the rest when the request ends) and asks, right before it parses a
request's body, how long its tenant must wait (:meth:`wait_s`); after a wait it asks again,
until the answer is no wait, and only then parses, with no await in between. Every
request's measured work, over its tenant's share of the loop, moves its tenant's clock
forward from now (never from a past it was idle in); a request waits until its tenant's
clock is back to now (less a small burst), so a tenant's requests together use at most its
share of the loop, however it mixes cheap and expensive ones. A tenant's share is its
weight (``auth.tenants[].weight``, as in the fair queue) over the sum of the configured
tenants' weights. Only a tenant that sent a request costing at least :data:`CHEAP_S` gets
a clock (a cheap tenant costs a dict lookup per request and never waits), and it is
forgotten once its clock is back to now (its debt repaid): a clock only ever counts while
it is ahead, so a tenant's idle time buys it nothing.

Requests sent together are spaced by their parses without any reservation: each one's
last check and its parse run with nothing else in between, so the next one's check sees
that parse charged, and requests that woke together check again one after the other.
Nothing is reserved ahead on an expected cost: a reservation outstanding across a wait
made one slow parse (a collection pause, a busy machine) cost every request of a
legitimate burst behind it as much, and spaced or refused that burst.

The share is fixed, not a part of what the tenants active now leave: a tenant whose turns
came faster when the others were idle would learn from its own waits whether anyone else
was being served. The only tenant, and a name not configured, are never rationed. A wait
longer than ``max_wait_s``, or one more than ``max_waiting`` requests of the tenant
already wait, is not queued: the request is refused (the caller's 429; a waiting request
may hold its body in memory: the waits are bounded in number, not only in time).
"""

from __future__ import annotations

from collections.abc import Mapping

from synapse_common import clock as clocks

CHEAP_S = 0.002         # a request's work below this does not start a tenant's clock


class LoopShare:
    def __init__(self, weights: Mapping[str, float] | None = None, *, burst_s: float = 0.05,
                 max_wait_s: float = 10.0, max_waiting: int = 16,
                 clock: clocks.Clock = clocks.monotonic) -> None:
        """``weights``: each configured tenant's weight (none, or one tenant: nobody is
        rationed)."""
        weights = dict(weights or {})
        total = sum(weights.values())
        # tenant -> 1 / its share: what one second of its work costs its clock
        self._parts = ({name: total / w for name, w in weights.items()}
                       if len(weights) > 1 else {})
        self.burst_s = burst_s
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self._clock = clock
        self._clocks: dict[str, float] = {}     # tenant -> its clock, while ahead of now
        self._waiting: dict[str, int] = {}      # tenant -> its requests waiting now

    def wait_s(self, tenant: str) -> float | None:
        """Seconds ``tenant``'s request must wait before its work (0.0: none); None when
        that would be over ``max_wait_s``, or ``max_waiting`` of its requests wait already
        (refuse it). A positive wait must be followed by :meth:`waited` when it ends,
        however it ends, and then by this question again."""
        at = self._clocks.get(tenant)
        if at is None:
            return 0.0
        now = self._clock()
        wait = at - self.burst_s - now
        if wait <= 0:
            if at <= now:
                del self._clocks[tenant]
            return 0.0
        if wait > self.max_wait_s:
            return None
        waiting = self._waiting.get(tenant, 0)
        if waiting >= self.max_waiting:
            return None
        self._waiting[tenant] = waiting + 1
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
        at = self._clocks.get(tenant)
        if at is None and seconds < CHEAP_S:
            return
        part = self._parts.get(tenant)
        if part is None:
            return
        now = self._clock()
        if at is None or at < now:     # no debt left: a clock from now, or none if cheap
            if seconds < CHEAP_S:
                del self._clocks[tenant]
                return
            at = now
        self._clocks[tenant] = at + seconds * part

    def share(self, tenant: str) -> float:
        """``tenant``'s share of the loop (1.0: never rationed)."""
        return 1 / self._parts.get(tenant, 1.0)

    def rationed(self) -> list[str]:
        """The tenants with a clock (whose requests may wait)."""
        return sorted(self._clocks)
