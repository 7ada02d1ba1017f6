"""The serving workers of one pod queue as one fair queue: a request's place is its class
and finish tag across every worker's queue (tags, clocks and heads shared over the mesh,
stood in for by :func:`test_seat_holding.joined`), whichever worker it came in on and
wherever the seats free (probe 95: a quiet tenant behind a tenant of n: 4 requests)."""

from __future__ import annotations

import asyncio

from controlplane.core import fair_queue
from tests.clock import ManualClock
from tests.controlplane.test_fair_queue import MODEL, Fleet, cancel, request, settle_until
from tests.controlplane.test_seat_holding import joined, stopped_clock_gate

BOB = 820           # prompt + n: 4 x max_tokens: 200, the seats of the whole engine
ALICE = 20          # a short prompt, max_tokens: 5


def heard(gate: fair_queue.Gate, tag: float) -> bool:
    """Whether ``gate`` knows of a sibling's head of finish tag ``tag``."""
    return any(t == tag for _, t, _, _ in gate._sibling_heads.get(MODEL, {}).values())


async def test_a_quiet_tenant_goes_at_the_next_free_seat_though_it_frees_on_the_other_worker(
        ) -> None:
    """Bob's requests of four seats wait on both workers, alice's of one on worker B; the
    request in flight ends on worker A. In one queue alice's smaller tag makes her the
    head, and she goes at the next free seat; before, A sent its own head on at once
    (room for all four seats) and alice waited behind every one of bob's."""
    clock = ManualClock()
    engine = Fleet(free=4)
    a = stopped_clock_gate(engine, clock, hold_s=10.0)
    b = stopped_clock_gate(engine, clock, hold_s=10.0)
    joined(a, b)
    await asyncio.wait_for(request(a, engine, "bob-0", "bob", tokens=BOB, sequences=4), 5)
    bobs = [asyncio.create_task(request(gate, engine, name, "bob", tokens=BOB, sequences=4))
            for gate, name in ((a, "bob-a1"), (b, "bob-b1"), (a, "bob-a2"))]
    await settle_until(lambda: a.depth(MODEL) == 2 and b.depth(MODEL) == 1, "bob to queue")
    alice = asyncio.create_task(request(b, engine, "alice", "alice", tokens=ALICE))
    await settle_until(lambda: b.depth(MODEL) == 2 and heard(a, ALICE), "A to hear of alice")
    engine.free += 4                # bob-0 ended, on worker A
    a.wake(MODEL)
    await asyncio.wait_for(alice, 5)
    await asyncio.sleep(0.05)
    assert engine.released == ["bob-0", "alice"], "bob's next holds the three seats left"
    engine.free += 1                # alice ended
    b.wake(MODEL)
    await settle_until(lambda: len(engine.released) == 3, "bob's next to go")
    assert engine.released[2] == "bob-a1"   # the earliest of bob's, on either worker
    await cancel(*bobs)
    await a.close()
    await b.close()


async def test_a_quiet_tenant_passes_a_siblings_head_holding_seats_for_a_later_turn(
        ) -> None:
    """Worker A's head of four seats holds the one seat free; alice's request of one
    seat comes in on worker B with a smaller tag: in one queue she would be the head and
    go at once. Before, B sent nothing on while A's head held seats (up to its
    ``max_seat_hold_s``, each time anew)."""
    clock = ManualClock()
    engine = Fleet(free=4)
    a = stopped_clock_gate(engine, clock, hold_s=10.0)
    b = stopped_clock_gate(engine, clock, hold_s=10.0)
    joined(a, b)
    await asyncio.wait_for(request(a, engine, "bob-0", "bob", tokens=BOB, sequences=4), 5)
    bob = asyncio.create_task(request(a, engine, "bob-1", "bob", tokens=BOB, sequences=4))
    await settle_until(lambda: a.depth(MODEL) == 1, "bob to queue")
    engine.free += 1
    a.wake(MODEL)
    await settle_until(lambda: MODEL in b._sibling_heads, "B to hear of A's head")
    await asyncio.sleep(0.02)
    assert engine.released == ["bob-0"], "bob-1 holds the free seat"
    await asyncio.wait_for(request(b, engine, "alice", "alice", tokens=ALICE), 5)
    assert engine.released == ["bob-0", "alice"]
    await cancel(bob)
    await a.close()
    await b.close()


async def test_a_large_request_on_one_worker_is_passed_only_for_its_fair_share() -> None:
    """A stream of small requests from another tenant on worker B passes worker A's large
    head only while their tags are smaller, as in one queue: B keeps the tags of the
    pod's busy period (they would start afresh each time its own queue emptied, and the
    stream would pass the large request for ever), and then the large one holds the seats
    that free until it has both."""
    clock = ManualClock()
    engine = Fleet(free=0)
    a = stopped_clock_gate(engine, clock, hold_s=1000.0)
    b = stopped_clock_gate(engine, clock, hold_s=1000.0)
    joined(a, b)
    big = asyncio.create_task(request(a, engine, "big", "x", tokens=300, sequences=2))
    await settle_until(lambda: a.depth(MODEL) == 1, "the large request to queue")
    small = []
    for i in range(8):
        small.append(asyncio.create_task(request(b, engine, f"small-{i}", "y", tokens=100)))
        await settle_until(lambda i=i: b.depth(MODEL) + len(engine.released) > i,
                           f"small-{i} to queue")
        engine.free += 1                # a seat frees on B
        b.wake(MODEL)
        await asyncio.sleep(0.02)
        if big.done():
            break
    assert big.done(), engine.released
    # Tags 100 and 200 go before the large one's 300; the tie at 300 goes to worker A.
    assert engine.released == ["small-0", "small-1", "big"]
    await cancel(*small)
    await a.close()
    await b.close()
