"""The fair queue settles tags: a tenant queued with a small estimate (no ``max_tokens``:
``fairness.default_completion_tokens``) that then generates far more pays for it in its
next turns, so sending no ``max_tokens`` does not buy a bigger share of saturated seats."""

from __future__ import annotations

import asyncio

from controlplane.core import fair_queue
from tests.controlplane.fair_queue_testing import MODEL, Fleet, cancel, gate_for, settle_until

CHEAT, HONEST = "cheat", "honest"
CHARGED = {CHEAT: 100, HONEST: 1000}    # what each is queued with
USED = 1000                             # what each request really takes


async def first_releases(settle: bool, n: int = 10) -> list[str]:
    """Ten requests of each tenant wait for one seat; seats free one at a time, each
    request ending (and, with ``settle``, settling its tag) before the next is freed."""
    fleet = Fleet(free=0)
    gate = gate_for(fleet)
    order: list[str] = []

    async def one(tenant: str) -> None:
        await gate.wait(MODEL, tenant, "interactive", 1.0, CHARGED[tenant])
        fleet.free -= 1
        order.append(tenant)

    tasks = [asyncio.create_task(one(t)) for _ in range(10) for t in (CHEAT, HONEST)]
    await settle_until(lambda: gate.depth(MODEL) == 20, "every request queued")
    try:
        for i in range(n):
            fleet.free = 1
            gate.wake(MODEL)
            await settle_until(lambda i=i: len(order) > i, f"release {i + 1}")
            if settle:              # the request ended: the engine's usage is known
                tenant = order[i]
                gate.settle(MODEL, tenant, "interactive", 1.0, CHARGED[tenant], USED)
    finally:
        await cancel(*tasks)
    return order


async def test_a_tenant_charged_less_than_it_used_pays_in_its_next_turns() -> None:
    settled = await first_releases(settle=True)
    assert 4 <= settled.count(HONEST) <= 6, settled
    unsettled = await first_releases(settle=False)     # the estimate alone decides
    assert unsettled.count(HONEST) <= 1, unsettled


def test_settling_an_idle_queue_or_an_exact_estimate_changes_nothing() -> None:
    q = fair_queue.FairQueue(fair_queue.Options())
    q.settle(CHEAT, "interactive", 1.0, 100, 5000)             # never queued: no tags
    q.settle(CHEAT, "no-such-class", 1.0, 100, 5000)
    loop = asyncio.new_event_loop()
    try:
        futures = [loop.create_future() for _ in range(3)]
        a = q.push(CHEAT, "interactive", 1.0, 100, 0.0, futures[0])
        b = q.push(CHEAT, "interactive", 1.0, 100, 0.0, futures[1])
        c = q.push(HONEST, "interactive", 1.0, 250, 0.0, futures[2])
        assert q.pop() is a
        q.settle(CHEAT, "interactive", 1.0, 100, 100)           # the estimate was right
        assert q.pop() is b and (b.start, b.finish) == (100, 200)
        assert q.pop() is c
    finally:
        loop.close()
