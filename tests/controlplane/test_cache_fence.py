"""The cache fence (controlplane.core.cache_fence): an invalidation voids the stores of
lookups made before it — queued, or in flight while it deletes — and nothing else."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from controlplane import metrics as metrics_mod
from controlplane.adapters import l1
from controlplane.core import cache_fence, response_cache
from tests.controlplane.test_cache_support import answer, chat


def exact_cache(store: l1.MemoryL1 | None = None) -> response_cache.TieredCache:
    """A tiered cache with its exact layer only (no embedder, no L2)."""
    return response_cache.TieredCache(
        options=response_cache.Options(l1_budget_s=2.0, temperature_ceiling=0.7),
        l1=store if store is not None else l1.MemoryL1(1000, 10**7),
        metrics=metrics_mod.Metrics(CollectorRegistry()))


def test_the_fence_voids_what_an_invalidation_covers() -> None:
    fence = cache_fence.Fence()
    before = fence.epoch
    assert not fence.voids(before, "acme", "llama")
    fence.invalidated("acme", None)
    assert fence.voids(before, "acme", "llama") and fence.voids(before, "acme", "other")
    assert not fence.voids(before, "globex", "llama")
    assert not fence.voids(fence.epoch, "acme", "llama"), "a lookup after it is not voided"
    middle = fence.epoch
    fence.invalidated(None, "llama")
    assert fence.voids(middle, "globex", "llama") and not fence.voids(middle, "globex", "x")
    fence.invalidated(None, None)
    assert fence.voids(fence.epoch - 1, "anyone", "anything")


def test_a_store_older_than_every_invalidation_remembered_is_voided() -> None:
    fence = cache_fence.Fence()
    before = fence.epoch
    for i in range(cache_fence.KEPT + 1):
        fence.invalidated(f"tenant-{i}", None)
    assert fence.voids(before, "nobody-invalidated", "llama")


async def test_an_answer_stored_after_an_invalidation_of_its_tenant_is_not_cached() -> None:
    cache = exact_cache()
    acme, globex = chat("What is the capital of France?"), chat("Same?", tenant="globex")
    acme_miss, globex_miss = await cache.lookup(acme), await cache.lookup(globex)
    assert acme_miss.status == globex_miss.status == "miss"
    await cache.invalidate(tenant="acme")      # while both answers were being generated
    cache.store(acme_miss, answer("old model's answer"))
    cache.store(globex_miss, answer("globex's answer"))
    await cache.drain()
    assert (await cache.lookup(acme)).status == "miss"
    assert (await cache.lookup(globex)).status == "hit-exact"
    again = await cache.lookup(acme)            # looked up after it: stored as ever
    cache.store(again, answer("new model's answer"))
    await cache.drain()
    assert (await cache.lookup(acme)).status == "hit-exact"


class SlowL1(l1.MemoryL1):
    """An L1 whose writes wait until ``go`` is set (a write in flight)."""

    def __init__(self) -> None:
        super().__init__(1000, 10**7)
        self.go = asyncio.Event()
        self.writing = asyncio.Event()

    async def set(self, tenant: str, model: str, key: str, value: bytes, ttl_s: float) -> bool:
        self.writing.set()
        await self.go.wait()
        return await super().set(tenant, model, key, value, ttl_s)


async def test_a_write_in_flight_during_an_invalidation_is_removed_once_it_lands() -> None:
    store = SlowL1()
    cache = exact_cache(store)
    request = chat("What is the capital of France?")
    miss = await cache.lookup(request)
    cache.store(miss, answer("old model's answer"))
    await asyncio.wait_for(store.writing.wait(), 5)     # past the writer's first check
    await cache.invalidate(model="llama")
    store.go.set()                                      # it lands after the deletes
    await cache.drain()
    assert len(store) == 0
    assert (await cache.lookup(request)).status == "miss"
