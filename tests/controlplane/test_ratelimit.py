"""Rate limits: local token bucket, and Redis-backed limits shared by two replicas."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import errors
from controlplane.adapters import redis_limits
from controlplane.core import ratelimit, tenants
from tests import harness
from tests.clock import ManualClock


async def test_local_bucket_refills_with_time_and_caps_concurrency() -> None:
    clock = ManualClock()
    limiter = ratelimit.RateLimiter(ratelimit.LocalStore(clock))
    t = tenants.Tenant("t", requests_per_second=2, burst=2, max_concurrent=10)
    permits = [await limiter.acquire(t, "r1"), await limiter.acquire(t, "r2")]
    with pytest.raises(errors.RateLimited) as err:
        await limiter.acquire(t, "r3")
    assert err.value.limit == "rate" and err.value.retry_after_s == pytest.approx(0.5)
    clock.now = 0.5
    permits.append(await limiter.acquire(t, "r4"))
    conc = tenants.Tenant("c", max_concurrent=1)
    p = await limiter.acquire(conc, "c1")
    with pytest.raises(errors.RateLimited) as err:
        await limiter.acquire(conc, "c2")
    assert err.value.limit == "concurrency" and err.value.headers()["Retry-After"] == "1"
    await limiter.release(p)
    await limiter.acquire(conc, "c3")
    for permit in permits:
        await limiter.release(permit)
    free = await limiter.acquire(tenants.Tenant("free"), "f")
    assert free.store is None


async def test_redis_limits_hold_across_replicas_and_fall_back_when_redis_dies(
        redis_server: harness.RedisServer) -> None:
    errors_seen: list[Exception] = []
    clients = [redis_limits.connect(redis_server.url) for _ in range(2)]
    replicas = [ratelimit.RateLimiter(
        ratelimit.LocalStore(ManualClock()), redis_limits.RedisLimitStore(c, 1.0, lease_s=60),
        errors_seen.append) for c in clients]
    t = tenants.Tenant("shared", requests_per_second=0.01, burst=3)
    for i in range(3):  # the burst is spent across both replicas together
        await replicas[i % 2].acquire(t, f"r{i}")
    for replica in replicas:
        with pytest.raises(errors.RateLimited):
            await replica.acquire(t, "again")
    conc = tenants.Tenant("conc", max_concurrent=1)
    held = await replicas[0].acquire(conc, "c1")
    with pytest.raises(errors.RateLimited):
        await replicas[1].acquire(conc, "c2")
    await replicas[0].release(held)
    await replicas[1].acquire(conc, "c3")
    assert not errors_seen
    redis_server.kill()
    # Redis gone: each replica falls back to its own bucket instead of failing requests.
    await replicas[0].acquire(tenants.Tenant("x", requests_per_second=5), "r")
    assert errors_seen
    for c in clients:
        await c.aclose()


async def test_a_reused_request_id_takes_a_concurrency_slot_of_its_own_in_redis(
        redis_server: harness.RedisServer) -> None:
    """``x-request-id`` is the client's to choose: a tenant sending every request with the
    same id must still be held to ``max_concurrent`` (the Redis set of requests in flight
    once counted them as one), and one of them ending frees one slot, not all."""
    client = redis_limits.connect(redis_server.url)
    try:
        replicas = [ratelimit.RateLimiter(ratelimit.LocalStore(ManualClock()),
                                          redis_limits.RedisLimitStore(client, 1.0, lease_s=60))
                    for _ in range(2)]
        conc = tenants.Tenant("reuser", max_concurrent=2)
        held = [await replicas[0].acquire(conc, "same"), await replicas[1].acquire(conc, "same")]
        for replica in replicas:
            with pytest.raises(errors.RateLimited) as err:
                await replica.acquire(conc, "same")
            assert err.value.limit == "concurrency"
        await replicas[0].release(held[0])
        again = await replicas[1].acquire(conc, "same")
        with pytest.raises(errors.RateLimited):
            await replicas[0].acquire(conc, "same")
        for permit in (held[1], again):
            await replicas[0].release(permit)
        await replicas[0].acquire(conc, "same")
    finally:
        await client.aclose()


class _Refusing:
    """A shared store that refuses on rate, naming a retry, or on concurrency."""

    def __init__(self, which: str, retry_s: float) -> None:
        self.which, self.retry_s = which, retry_s

    async def acquire(self, tenant: str, rate: float, burst: int, max_concurrent: int,
                      slot: str) -> tuple[bool, float, str]:
        return False, self.retry_s, self.which

    async def release(self, tenant: str, slot: str) -> None:
        pass


async def test_the_head_peek_keeps_a_shared_rate_refusal_until_its_token() -> None:
    clock = ManualClock()
    t = tenants.Tenant("t", requests_per_second=1, burst=1, max_concurrent=5)
    limiter = ratelimit.RateLimiter(ratelimit.LocalStore(clock), _Refusing("rate", 4.0))
    assert limiter.peek(t).allowed                  # nothing known yet: the store decides
    with pytest.raises(errors.RateLimited):
        await limiter.acquire(t, "r")
    clock.now = 3.0
    seen = limiter.peek(t)
    assert not seen.allowed and seen.limit == "rate"
    assert seen.retry_after_s == pytest.approx(1.0 - 0.001)
    clock.now = 4.0                                 # the store's token has come
    assert limiter.peek(t).allowed
    busy = ratelimit.RateLimiter(ratelimit.LocalStore(clock), _Refusing("concurrency", 1.0))
    with pytest.raises(errors.RateLimited):
        await busy.acquire(t, "r")
    assert busy.peek(t).allowed                     # a slot may free on any replica


async def test_the_head_peek_of_the_local_bucket_sees_rate_and_concurrency() -> None:
    clock = ManualClock()
    limiter = ratelimit.RateLimiter(ratelimit.LocalStore(clock))
    t = tenants.Tenant("t", requests_per_second=1, burst=2, max_concurrent=1)
    p = await limiter.acquire(t, "r1")
    seen = limiter.peek(t)
    assert not seen.allowed and seen.limit == "concurrency"
    await limiter.release(p)
    assert limiter.peek(t).allowed                  # a token left, no slot taken
    await limiter.release(await limiter.acquire(t, "r2"))
    seen = limiter.peek(t)
    assert not seen.allowed and seen.limit == "rate"
    assert seen.retry_after_s == pytest.approx(1.0)
    assert limiter.peek(t).retry_after_s == pytest.approx(1.0)   # peeking takes nothing


class _Slow:
    """A shared store whose reply comes when the test says, after it has taken the slot
    (as Redis's script runs before its reply reaches the caller)."""

    def __init__(self) -> None:
        self.reply = asyncio.Event()
        self.held: set[str] = set()

    async def acquire(self, tenant: str, rate: float, burst: int, max_concurrent: int,
                      slot: str) -> tuple[bool, float, str]:
        self.held.add(slot)
        await self.reply.wait()
        return True, 0.0, ""

    async def release(self, tenant: str, slot: str) -> None:
        self.held.discard(slot)


async def test_a_request_cancelled_while_the_store_decides_leaves_no_slot_behind() -> None:
    """The client went away while the store's answer was on its way: the slot the store
    granted is released once the answer comes (before, it stayed held for its lease: no
    permit existed to release it)."""
    store = _Slow()
    limiter = ratelimit.RateLimiter(ratelimit.LocalStore(ManualClock()), store)
    t = tenants.Tenant("t", max_concurrent=1)
    asking = asyncio.create_task(limiter.acquire(t, "r"))
    await harness.until(lambda: bool(store.held), 5, "the store's script ran")
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    store.reply.set()
    await harness.until(lambda: not store.held, 5, "the granted slot released")
