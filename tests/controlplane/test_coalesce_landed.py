"""The coalescer's landed answers (controlplane.core.coalesce): kept per tenant, so one
tenant's burst never costs another its copy, and dropped when the cache is invalidated."""

from __future__ import annotations

from typing import Any

from controlplane.core import cache_port, coalesce
from tests.controlplane.test_cache_support import answer


class MissingCache:
    """A cache that never has the entry yet (its writes have not landed)."""

    def __init__(self) -> None:
        self.stored: list[str] = []

    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        question = request.body["messages"][-1]["content"]
        return cache_port.CacheDecision(status="miss", may_store=True,
                                        exact_key=f"{request.tenant}:{question}")

    def store(self, decision: cache_port.CacheDecision, response: Any) -> None:
        self.stored.append(decision.exact_key)


def ask(tenant: str, question: str) -> cache_port.CacheRequest:
    return cache_port.CacheRequest(tenant, "llama", "chat", {
        "model": "llama", "messages": [{"role": "user", "content": question}]})


async def lead(coalescer: coalesce.Coalescer, cache: MissingCache, tenant: str,
               question: str) -> None:
    """One request that misses, leads, and lands its answer."""
    decision = await coalescer.lookup(cache, ask(tenant, question))
    assert decision.status == "miss"
    coalescer.store(cache, decision, answer(f"{tenant}: {question}"))


async def test_one_tenants_burst_leaves_room_for_anothers_landed_answer() -> None:
    coalescer, cache = coalesce.Coalescer(grace_s=60.0, tenants=2), MissingCache()
    for i in range(coalesce.LANDED_MAX):      # a fills what all tenants once shared
        await lead(coalescer, cache, "a", f"question {i}")
    await lead(coalescer, cache, "b", "b's question")
    again = await coalescer.lookup(cache, ask("b", "b's question"))
    assert again.status == "hit-exact" and again.reason == "coalesced"
    newest = await coalescer.lookup(cache, ask("a", f"question {coalesce.LANDED_MAX - 1}"))
    oldest = await coalescer.lookup(cache, ask("a", "question 0"))
    assert newest.status == "hit-exact", "a keeps its share, newest first"
    assert oldest.status == "miss", "a's oldest copy went to make room for its own"


async def test_an_invalidation_drops_the_landed_answers() -> None:
    coalescer, cache = coalesce.Coalescer(grace_s=60.0), MissingCache()
    await lead(coalescer, cache, "a", "question")
    coalescer.forget_landed()
    assert (await coalescer.lookup(cache, ask("a", "question"))).status == "miss"


async def test_forgetting_one_tenants_landed_answers_keeps_the_others() -> None:
    """A wrong verdict drops its tenant's landed copies: one tenant judging its own hits
    wrong in a loop must not flush everyone's."""
    coalescer, cache = coalesce.Coalescer(grace_s=60.0, tenants=2), MissingCache()
    await lead(coalescer, cache, "a", "question")
    await lead(coalescer, cache, "b", "question")
    coalescer.forget_landed("a", "llama")
    assert (await coalescer.lookup(cache, ask("a", "question"))).status == "miss"
    assert (await coalescer.lookup(cache, ask("b", "question"))).status == "hit-exact"


async def test_a_coalesced_hit_keeps_the_lookups_work_on_the_body() -> None:
    class CostlyCache(MissingCache):
        async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
            missed = await super().lookup(request)
            return cache_port.CacheDecision(status="miss", may_store=True,
                                            exact_key=missed.exact_key, work_s=0.25)
    coalescer, cache = coalesce.Coalescer(grace_s=60.0), CostlyCache()
    await lead(coalescer, cache, "a", "question")
    again = await coalescer.lookup(cache, ask("a", "question"))
    assert (again.reason, again.work_s) == ("coalesced", 0.25)   # the loop share's charge
