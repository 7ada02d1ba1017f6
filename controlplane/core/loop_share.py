"""Each tenant's fair share of a serving process's event loop (pure; injected clock).

A serving process runs every tenant's requests on one event loop, so the synchronous work
of one request (parsing its body, deriving its cache keys, tokenizing its prompt, hashing
its blocks) is time every other request waits. Rate limits count requests and tokens, not
that CPU, and a body the size limit admits can cost a hundred milliseconds of it: one
tenant sending such bodies back to back held the loop nearly all the time, and every
other tenant's requests waited behind them.

So the serving path measures that work per request (:meth:`LoopShare.charge`: a parse
as soon as it is done, the rest when the request ends) and asks, before it reads a
request's body (and again before the parse when the body was still arriving), how long
its tenant must wait (:meth:`wait_s`). Every
request's measured work, over its tenant's share of the loop, moves its tenant's clock
forward; a request waits until its tenant's clock is back to now (less a small burst),
so a tenant's requests together use at most its share of the loop, however it mixes
cheap and expensive ones. A tenant's share is its weight (``auth.tenants[].weight``, as
in the fair queue) over the sum of the configured tenants' weights. Only a tenant that
sent a request costing at least :data:`CHEAP_S` gets a clock (a cheap tenant costs a
dict lookup per request and never waits), and it is forgotten once its clock has stood
still for ``idle_s``. While it has one, each of its requests also reserves the work it
is expected to cost (the last expensive request's, averaged with the cheap ones) before
it starts, corrected when it is measured, so that requests sent together are spaced out
rather than all let through at once.

The share is fixed, not a part of what the tenants active now leave: a tenant whose turns
came faster when the others were idle would learn from its own waits whether anyone else
was being served. The only tenant, and a name not configured, are never rationed. A wait
longer than ``max_wait_s``, or one more than ``max_waiting`` requests of the tenant
already wait, is not queued: the request is refused (the caller's 429) without reserving
(a waiting request may hold its body in memory: the waits are bounded in number, not
only in time).
"""

from __future__ import annotations

from collections.abc import Mapping

from synapse_common import clock as clocks

CHEAP_S = 0.002         # a request's work below this does not start a tenant's clock
AVERAGE_WEIGHT = 0.3    # of the latest measure in a tenant's expected cost
NO_WAIT = (0.0, 0.0)    # wait_s's answer for a tenant without a clock


class LoopShare:
    def __init__(self, weights: Mapping[str, float] | None = None, *, burst_s: float = 0.05,
                 max_wait_s: float = 10.0, max_waiting: int = 16, idle_s: float = 10.0,
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
        self.idle_s = idle_s
        self._clock = clock
        # tenant -> [its clock, the cost its next request is expected to have]
        self._clocks: dict[str, list[float]] = {}
        self._waiting: dict[str, int] = {}      # tenant -> its requests waiting now

    def wait_s(self, tenant: str) -> tuple[float, float] | None:
        """(seconds ``tenant``'s new request waits, seconds of the loop it reserved), to be
        handed back to :meth:`charge`; None when the wait would be over ``max_wait_s`` or
        ``max_waiting`` of its requests wait already (refuse it; nothing reserved). A
        positive wait must be followed by :meth:`waited` when it ends, however it ends."""
        kept = self._clocks.get(tenant)
        if kept is None:
            return NO_WAIT
        now = self._clock()
        at, expected = kept
        if at < now - self.idle_s:
            del self._clocks[tenant]
            return NO_WAIT
        start = max(now, at)
        wait = max(0.0, start - self.burst_s - now)
        if wait > self.max_wait_s:
            return None
        if wait > 0:
            waiting = self._waiting.get(tenant, 0)
            if waiting >= self.max_waiting:
                return None
            self._waiting[tenant] = waiting + 1
        reserved = expected * self._parts[tenant]
        kept[0] = start + reserved
        return wait, reserved

    def waited(self, tenant: str) -> None:
        """One of ``tenant``'s requests that :meth:`wait_s` made wait has stopped waiting."""
        waiting = self._waiting.get(tenant, 0) - 1
        if waiting > 0:
            self._waiting[tenant] = waiting
        else:
            self._waiting.pop(tenant, None)

    def charge(self, tenant: str, seconds: float, reserved: float = 0.0) -> None:
        """One of ``tenant``'s requests took ``seconds`` of the loop's synchronous work;
        ``reserved`` is what :meth:`wait_s` reserved for it."""
        kept = self._clocks.get(tenant)
        if kept is None:
            part = self._parts.get(tenant)
            if seconds >= CHEAP_S and part is not None:
                self._clocks[tenant] = [self._clock() + seconds * part, seconds]
            return
        kept[0] += seconds * self._parts[tenant] - reserved
        kept[1] = (seconds if seconds >= CHEAP_S
                   else kept[1] + (seconds - kept[1]) * AVERAGE_WEIGHT)

    def share(self, tenant: str) -> float:
        """``tenant``'s share of the loop (1.0: never rationed)."""
        return 1 / self._parts.get(tenant, 1.0)

    def rationed(self) -> list[str]:
        """The tenants with a clock (whose requests may wait)."""
        return sorted(self._clocks)
