"""Per-tenant rate limits: a token bucket (requests/s with a burst) and a concurrency cap.

Where the state lives is a :class:`LimitStore`: :class:`LocalStore` in this process, or
the Redis store in ``controlplane.adapters.redis_limits`` (one Lua script per check, so
the limit holds across replicas). :class:`RateLimiter` uses the Redis store when given
and falls back to the local one when Redis fails or is slow: a limiter outage must not
turn into an outage of the API, and the local bucket still bounds each replica.

A request takes one token and one concurrency slot; the slot is released when the
response is finished (or aborted). ``Retry-After`` is when the next token appears, or a
second for a concurrency refusal (the slot frees when some request ends). A request
cancelled (its client gone) while the shared store is deciding may already hold a slot
there (the script ran; its reply had not come): the store's answer is awaited apart from
the request, and a slot it granted is released at once, not left to its lease (with
``max_concurrent`` 1, one dropped connection would lock the tenant out for the lease).
The local store decides without a wait: nothing to abandon there.

:meth:`RateLimiter.peek` answers at a request's head, taking nothing, whether it would be
refused (the fast lane then drops its body unread): by this process's bucket, or with a
shared store by the last rate refusal the store gave the tenant here (no replica can add
a token before the time it named: tokens come only with time).

A slot is named by the limiter, never by the client: the request id comes from the
client's ``x-request-id`` when it sends one, so a tenant sending all its requests with one
id would otherwise hold a single entry of the shared set of requests in flight however
many it ran (``max_concurrent`` bypassed), and the end of any of them would free it.
Each permit's slot is this limiter's random prefix and a counter: unique across replicas.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import uuid
from collections.abc import Callable
from typing import Protocol

from controlplane import errors
from controlplane.core import tenants
from synapse_common import aiotasks
from synapse_common import clock as clocks


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    rate: float | None
    burst: int
    max_concurrent: int | None

    @classmethod
    def of(cls, tenant: tenants.Tenant) -> Limits:
        """The tenant's limits (memoised per tenant: tenants are frozen and few)."""
        return _limits_of(tenant)

    @classmethod
    def compute(cls, tenant: tenants.Tenant) -> Limits:
        rate = tenant.requests_per_second
        burst = tenant.burst or (max(1, int(rate * 2)) if rate else 1)
        return cls(rate, burst, tenant.max_concurrent)

    @property
    def unlimited(self) -> bool:
        return self.rate is None and self.max_concurrent is None


@functools.lru_cache(maxsize=1024)
def _limits_of(tenant: tenants.Tenant) -> Limits:
    return Limits.compute(tenant)


# The shared store rounds a retry up to a millisecond: a refusal remembered here ends
# that much earlier, so it never outlasts the store's own.
_STORE_ROUNDING_S = 0.001


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""                  # "rate" | "concurrency"


class LimitStore(Protocol):
    """Shared limit state; ``acquire`` returns (allowed, retry after seconds, limit)."""

    async def acquire(self, tenant: str, rate: float, burst: int, max_concurrent: int,
                      slot: str) -> tuple[bool, float, str]: ...

    async def release(self, tenant: str, slot: str) -> None: ...


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    active: int = 0


class LocalStore:
    """Limits held in this process (no Redis configured, or Redis failing)."""

    def __init__(self, clock: clocks.Clock) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._refused_until: dict[str, float] = {}   # tenant -> when a shared store's
                                                     # rate refusal ends (its clock)

    def check(self, tenant: str, limits: Limits) -> Verdict:
        now = self._clock()
        b = self._buckets.get(tenant)
        if b is None:
            b = self._buckets[tenant] = _Bucket(float(limits.burst), now)
        if limits.rate:
            b.tokens = min(float(limits.burst), b.tokens + (now - b.stamp) * limits.rate)
        b.stamp = now
        if limits.max_concurrent is not None and b.active >= limits.max_concurrent:
            return Verdict(False, 1.0, "concurrency")
        if limits.rate:
            if b.tokens < 1.0:
                return Verdict(False, (1.0 - b.tokens) / limits.rate, "rate")
            b.tokens -= 1.0
        b.active += 1
        return Verdict(True)

    async def acquire(self, tenant: str, rate: float, burst: int, max_concurrent: int,
                      slot: str) -> tuple[bool, float, str]:
        v = self.check(tenant, Limits(rate or None, burst, max_concurrent or None))
        return v.allowed, v.retry_after_s, v.limit

    def peek(self, tenant: str, limits: Limits) -> Verdict:
        """What :meth:`check` would answer ``tenant`` now, taking nothing."""
        b = self._buckets.get(tenant)
        if b is None:
            return Verdict(True)
        if limits.max_concurrent is not None and b.active >= limits.max_concurrent:
            return Verdict(False, 1.0, "concurrency")
        if limits.rate:
            tokens = min(float(limits.burst),
                         b.tokens + (self._clock() - b.stamp) * limits.rate)
            if tokens < 1.0:
                return Verdict(False, (1.0 - tokens) / limits.rate, "rate")
        return Verdict(True)

    def now(self) -> float:
        return self._clock()

    def refused_until(self, tenant: str, until: float) -> None:
        """A shared store refused ``tenant`` on its rate: it has no token before ``until``
        (this store's clock)."""
        self._refused_until[tenant] = max(until, self._refused_until.get(tenant, until))

    def refusal(self, tenant: str) -> Verdict:
        """The shared store's last rate refusal of ``tenant`` while it still holds."""
        until = self._refused_until.get(tenant)
        if until is None:
            return Verdict(True)
        left = until - self._clock()
        if left <= 0:
            del self._refused_until[tenant]
            return Verdict(True)
        return Verdict(False, left, "rate")

    def release_now(self, tenant: str) -> None:
        b = self._buckets.get(tenant)
        if b is not None and b.active > 0:
            b.active -= 1

    async def release(self, tenant: str, slot: str) -> None:
        self.release_now(tenant)


@dataclasses.dataclass(slots=True)
class Permit:
    tenant: str
    slot: str                       # its id in the store (the limiter's, unique)
    store: LimitStore | None        # None: nothing to release


class RateLimiter:
    def __init__(self, local: LocalStore, shared: LimitStore | None = None,
                 on_store_error: Callable[[Exception], None] | None = None) -> None:
        self._local = local
        self._shared = shared
        self._on_error = on_store_error
        self._slot_prefix = uuid.uuid4().hex[:16]
        self._slots = itertools.count(1)

    async def acquire(self, tenant: tenants.Tenant, request_id: str) -> Permit:
        """A permit, or :class:`errors.RateLimited` naming the limit hit. The permit's
        slot is named here: ``request_id`` (the client's to choose) is not its name."""
        limits = Limits.of(tenant)
        if limits.unlimited:
            return Permit(tenant.name, "", None)
        slot = f"{self._slot_prefix}{next(self._slots):x}"
        store: LimitStore = self._local
        verdict: Verdict | None = None
        if self._shared is not None:
            asked = self._local.now()      # before the store's clock read the bucket
            try:
                allowed, retry, which = await self._ask_store(tenant.name, limits, slot)
                verdict = Verdict(allowed, retry, which)
                store = self._shared
                if not allowed and which == "rate":     # its retry is rounded up to 1 ms
                    self._local.refused_until(tenant.name, asked + retry - _STORE_ROUNDING_S)
            except Exception as exc:  # fall back to the local bucket; counted by the caller
                if self._on_error:
                    self._on_error(exc)
        if verdict is None:
            verdict = self._local.check(tenant.name, limits)
        if not verdict.allowed:
            raise self.refusal(tenant, verdict)
        return Permit(tenant.name, slot, store)

    async def _ask_store(self, tenant: str, limits: Limits,
                         slot: str) -> tuple[bool, float, str]:
        """The shared store's answer for ``slot``. The call outlives the caller's
        cancellation: the store may have granted the slot (its script ran) before the
        reply came, and no permit would then exist to release it."""
        assert self._shared is not None
        store = self._shared
        # a slot granted to a caller cancelled meanwhile is released
        return await aiotasks.outliving(
            store.acquire(tenant, limits.rate or 0.0, limits.burst,
                          limits.max_concurrent or 0, slot),
            lambda answer: self.release(Permit(tenant, slot, store)) if answer[0] else None,
            self._on_error)

    def peek(self, tenant: tenants.Tenant) -> Verdict:
        """Whether :meth:`acquire` would refuse ``tenant`` now, as far as this process can
        tell at once, taking nothing (a request's body need not be read to be refused):
        its own bucket's rate and concurrency, or with a shared store the store's last
        rate refusal of the tenant while it holds (a concurrency slot may free any time
        on any replica: not remembered)."""
        limits = Limits.of(tenant)
        if limits.unlimited:
            return Verdict(True)
        if self._shared is None:
            return self._local.peek(tenant.name, limits)
        return self._local.refusal(tenant.name)

    def at_store(self, tenant: tenants.Tenant) -> bool:
        """Whether :meth:`acquire` asks a shared store for ``tenant`` (one is configured
        and the tenant has a limit): what :meth:`peek` cannot tell of it (a concurrency
        slot, a refusal the store gave another replica) only that call finds out."""
        return self._shared is not None and self.limited(tenant)

    @staticmethod
    def limited(tenant: tenants.Tenant) -> bool:
        """Whether :meth:`acquire` takes anything of ``tenant`` (a rate or concurrency
        limit): a request of an unlimited one costs nothing to admit."""
        return not Limits.of(tenant).unlimited

    @staticmethod
    def refusal(tenant: tenants.Tenant, verdict: Verdict) -> errors.RateLimited:
        """The 429 of a refused ``verdict``, naming the limit."""
        what = "requests per second" if verdict.limit == "rate" else "concurrent requests"
        return errors.RateLimited(
            f"tenant {tenant.name!r} is over its limit of {what}; retry after "
            f"{verdict.retry_after_s:.2f}s", retry_after_s=verdict.retry_after_s,
            limit=verdict.limit)

    async def release(self, permit: Permit) -> None:
        if permit.store is None:
            return
        if permit.store is self._local:
            self._local.release_now(permit.tenant)
            return
        try:
            await permit.store.release(permit.tenant, permit.slot)
        except Exception as exc:  # the slot's lease expires in Redis on its own
            if self._on_error:
                self._on_error(exc)
