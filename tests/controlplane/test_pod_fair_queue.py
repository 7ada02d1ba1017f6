"""The serving workers of one pod queue as one fair queue: a request's place is its class
and finish tag across every worker's queue (tags, clocks and heads shared over the mesh,
stood in for by :func:`test_seat_holding.joined`), whichever worker it came in on and
wherever the seats free (probe 95: a quiet tenant behind a tenant of n: 4 requests)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest

from controlplane.core import fair_queue, pod_order
from tests.clock import ManualClock
from tests.controlplane.fair_queue_testing import (
    MODEL,
    Fleet,
    Told,
    cancel,
    joined,
    request,
    settle_until,
    stopped_clock_gate,
)

BOB = 820           # prompt + n: 4 x max_tokens: 200, the seats of the whole engine
ALICE = 20          # a short prompt, max_tokens: 5


def heard(gate: fair_queue.Gate, tag: float) -> bool:
    """Whether ``gate`` knows of a sibling's head of finish tag ``tag``."""
    return any(h.tag == tag for h in gate.pod._heads.get(MODEL, {}).values())


def two_workers(free: int, hold_s: float) -> tuple[Fleet, fair_queue.Gate, fair_queue.Gate]:
    """Workers A and B of one pod, :func:`joined`, on one engine of ``free`` seats, their
    clock stopped and their pumps' waits counted (:func:`looked_again`)."""
    clock = ManualClock()
    engine = Fleet(free=free)
    a = stopped_clock_gate(engine, clock, hold_s=hold_s)
    b = stopped_clock_gate(engine, clock, hold_s=hold_s)
    for gate in (a, b):
        WAITS[gate] = 0
        gate._sleep = counted(gate, gate._sleep)
    joined(a, b)
    return engine, a, b


WAITS: dict[fair_queue.Gate, int] = {}     # how often each gate's pump chose to wait


def counted(gate: fair_queue.Gate, sleep: Any) -> Any:
    async def waits(seconds: float | None, wakeup: asyncio.Event | None) -> float | None:
        WAITS[gate] += 1
        return await sleep(seconds, wakeup)
    return waits


async def looked_again(gate: fair_queue.Gate, sent: Callable[[], bool] = lambda: False
                       ) -> None:
    """Until ``gate``'s pump has looked at its queue twice more and chosen to wait each
    time (what it would send on now, it has), or ``sent``."""
    start = WAITS[gate]
    await settle_until(lambda: sent() or WAITS[gate] >= start + 2, "the pump to look again")


async def test_a_quiet_tenant_goes_at_the_next_free_seat_though_it_frees_on_the_other_worker(
        ) -> None:
    """Bob's requests of four seats wait on both workers, alice's of one on worker B; the
    request in flight ends on worker A. In one queue alice's smaller tag makes her the
    head, and she goes at the next free seat; before, A sent its own head on at once
    (room for all four seats) and alice waited behind every one of bob's."""
    engine, a, b = two_workers(free=4, hold_s=10.0)
    await asyncio.wait_for(request(a, engine, "bob-0", "bob", tokens=BOB, sequences=4), 5)
    bobs = [asyncio.create_task(request(gate, engine, name, "bob", tokens=BOB, sequences=4))
            for gate, name in ((a, "bob-a1"), (b, "bob-b1"), (a, "bob-a2"))]
    await settle_until(lambda: a.depth(MODEL) == 2 and b.depth(MODEL) == 1, "bob to queue")
    alice = asyncio.create_task(request(b, engine, "alice", "alice", tokens=ALICE))
    await settle_until(lambda: b.depth(MODEL) == 2 and heard(a, ALICE), "A to hear of alice")
    engine.free += 4                # bob-0 ended, on worker A
    a.wake(MODEL)
    await asyncio.wait_for(alice, 5)
    await looked_again(a)
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
    engine, a, b = two_workers(free=4, hold_s=10.0)
    await asyncio.wait_for(request(a, engine, "bob-0", "bob", tokens=BOB, sequences=4), 5)
    bob = asyncio.create_task(request(a, engine, "bob-1", "bob", tokens=BOB, sequences=4))
    await settle_until(lambda: a.depth(MODEL) == 1, "bob to queue")
    engine.free += 1
    a.wake(MODEL)
    await settle_until(lambda: MODEL in b.pod._heads, "B to hear of A's head")
    await looked_again(a)
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
    engine, a, b = two_workers(free=0, hold_s=1000.0)
    big = asyncio.create_task(request(a, engine, "big", "x", tokens=300, sequences=2))
    await settle_until(lambda: a.depth(MODEL) == 1, "the large request to queue")
    small = []
    for i in range(8):
        small.append(asyncio.create_task(request(b, engine, f"small-{i}", "y", tokens=100)))
        await settle_until(lambda i=i: b.depth(MODEL) + len(engine.released) > i,
                           f"small-{i} to queue")
        engine.free += 1                # a seat frees on B
        b.wake(MODEL)
        await looked_again(a, sent=big.done)
        if big.done():
            break
    assert big.done(), engine.released
    # Tags 100 and 200 go before the large one's 300; the tie at 300 goes to worker A.
    assert engine.released == ["small-0", "small-1", "big"]
    await cancel(*small)
    await a.close()
    await b.close()


# -- reviewer-107's findings: a pod's queue stays live, fair and whole -------------------

class Heard(Told):
    """:class:`Told`, remembering each head told: (worker index, finish tag)."""

    def __init__(self, me: fair_queue.Gate, others: list[fair_queue.Gate],
                 heads: list[tuple[int, float]]) -> None:
        super().__init__(me, others)
        self._heads = heads

    def head(self, model: str, rank: int, tag: float, left_s: float, seq: int) -> None:
        self._heads.append((self._me.worker_index, tag if left_s > 0 else -1.0))
        super().head(model, rank, tag, left_s, seq)


def joined_heard(*gates: fair_queue.Gate) -> list[tuple[int, float]]:
    """:func:`joined`, and the heads told so far, in order."""
    heads: list[tuple[int, float]] = []
    for i, g in enumerate(gates):
        g.worker_index = i
        g.siblings = Heard(g, [o for o in gates if o is not g], heads)
    return heads


class Stallable:
    """A gate's sleep that moves ``clock`` by what it sleeps, or, once :attr:`stall` is
    set, never returns (the worker's event loop is stuck; its connection stays open)."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.stall = False
        self.stalled = asyncio.Event()

    async def __call__(self, seconds: float | None, wakeup: asyncio.Event | None,
                       ) -> float | None:
        if self.stall:
            self.stalled.set()
            await asyncio.Event().wait()
        self.clock.now += seconds or 0.0
        await asyncio.sleep(0.001)
        return None


def moving_gate(room: object, sleep: Stallable, deadline_s: float = 5.0) -> fair_queue.Gate:
    options = fair_queue.Options(poll_interval_s=0.05, max_seat_hold_s=2.0,
                                 deadline_s=deadline_s)
    return fair_queue.Gate(options, room, clock=sleep.clock, sleep=sleep)  # type: ignore[arg-type]


async def bob_then_alice(a: fair_queue.Gate, view_a: Fleet, b: fair_queue.Gate, view_b: Fleet,
                         clock: ManualClock, between_s: float = 0.0, alice_sequences: int = 1,
                         ) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """Workers A and B :func:`joined_heard`: bob's large request (1000) waits on A and is
    told as its head, then, ``between_s`` later, alice's small one (10) on B likewise."""
    heads = joined_heard(a, b)
    bob = asyncio.create_task(request(a, view_a, "bob", "bob", tokens=1000))
    await settle_until(lambda: (0, 1000.0) in heads, "A to tell bob")
    clock.now += between_s
    alice = asyncio.create_task(request(b, view_b, "alice", "alice", tokens=10,
                                        sequences=alice_sequences))
    await settle_until(lambda: (1, 10.0) in heads, "B to tell alice")
    return bob, alice


async def bob_goes(a: fair_queue.Gate, b: fair_queue.Gate, bob: asyncio.Task[None],
                   alice: asyncio.Task[None]) -> None:
    """Wakes A and waits for bob to go (his QueueTimeout raises), then cancels alice and
    closes both gates."""
    a.wake(MODEL)
    try:
        await asyncio.wait_for(bob, 5)
    finally:
        await cancel(alice)
        await a.close()
        await b.close()


async def one_seat_for(gate: fair_queue.Gate, engine: Fleet,
                       *waiting: tuple[str, str, int]) -> None:
    """``waiting`` (name, tenant, tokens) queued on ``gate`` in turn, then one seat frees:
    returns once one of them has taken it, the others cancelled."""
    before = len(engine.released)
    tasks = [asyncio.create_task(request(gate, engine, name, tenant, tokens=tokens))
             for name, tenant, tokens in waiting]
    await settle_until(lambda: gate.depth(MODEL) == len(waiting), "all to queue")
    engine.free = 1
    gate.wake(MODEL)
    await settle_until(lambda: len(engine.released) == before + 1, "a release")
    await cancel(*tasks)


async def test_a_stalled_sibling_does_not_keep_free_seats_idle_until_its_deadline() -> None:
    """Worker B told its head (alice, the smaller tag) and then stalled with its connection
    open. Worker A sees seats free all along: its head (bob) goes once B has left a seat
    free a sibling's seat holding and a few polls, not at B's head's deadline (bob's came
    first: a 503 with four seats free)."""
    clock = ManualClock()
    engine = Fleet(free=0)
    sleep_a, sleep_b = Stallable(clock), Stallable(clock)
    a, b = moving_gate(engine.room, sleep_a), moving_gate(engine.room, sleep_b)
    bob, alice = await bob_then_alice(a, engine, b, engine, clock, between_s=1.0)
    sleep_b.stall = True
    await asyncio.wait_for(sleep_b.stalled.wait(), 5)
    engine.free = 4
    await bob_goes(a, b, bob, alice)
    assert engine.released == ["bob"]


async def test_a_sibling_whose_view_has_no_room_does_not_stall_the_pod() -> None:
    """The workers' views of room differ (B's eligibility or learned seat limits say its
    backends are full, A's that they have room): B's head comes first and does not go,
    and A's later request goes after a bounded wait, not at B's head's deadline."""
    clock = ManualClock()
    view_a, view_b = Fleet(free=0), Fleet(free=0)
    a = moving_gate(view_a.room, Stallable(clock))
    b = moving_gate(view_b.room, Stallable(clock))
    bob, alice = await bob_then_alice(a, view_a, b, view_b, clock, between_s=1.0)
    view_a.free = 4                     # A's view: room; B's: none
    await bob_goes(a, b, bob, alice)
    assert view_a.released == ["bob"]


class Delayed:
    """:class:`Told` as the mesh is: what a gate tells reaches the others a moment later
    (the flush, then the sibling's read); :meth:`quiet` waits until nothing is on its way."""

    def __init__(self, told: Told) -> None:
        self._told = told
        self.on_the_way = 0

    def __getattr__(self, name: str) -> object:
        deliver = getattr(self._told, name)

        def later(*args: object) -> None:
            self.on_the_way += 1

            def arrive() -> None:
                self.on_the_way -= 1
                deliver(*args)
            asyncio.get_running_loop().call_later(0.002, arrive)
        return later


async def test_a_tenant_bursting_on_two_workers_gets_no_more_than_its_share() -> None:
    """Mallory sends 8 requests on each of two workers at the same moment; alice (same
    weight and size) has 8 waiting on A. One queue releases them alternately: 6 of the
    first 12 each. With each worker's tags taken as they were (each not yet told of the
    other's burst), mallory had two of every three seats, on every burst."""
    engine, a, b = two_workers(free=0, hold_s=10.0)
    mesh = [Delayed(g.siblings) for g in (a, b)]   # type: ignore[arg-type]
    a.siblings, b.siblings = mesh           # type: ignore[assignment]

    async def quiet() -> None:
        await settle_until(lambda: not any(m.on_the_way for m in mesh), "the mesh")

    tasks = [asyncio.create_task(request(a, engine, f"alice-{i}", "alice")) for i in range(8)]
    await settle_until(lambda: a.depth(MODEL) == 8, "alice to queue")
    await quiet()
    tasks += [asyncio.create_task(request(g, engine, f"mallory-{n}{i}", "mallory"))
              for g, n in ((a, "a"), (b, "b")) for i in range(8)]
    await settle_until(lambda: a.depth(MODEL) == 16 and b.depth(MODEL) == 8, "mallory")
    await quiet()
    for _ in range(12):
        before = len(engine.released)
        engine.free += 1
        a.wake(MODEL)
        await settle_until(lambda before=before: len(engine.released) > before, "a release")
        await quiet()                       # the next heads told
    mallory = sum(name.startswith("mallory") for name in engine.released[:12])
    await cancel(*tasks)
    await a.close()
    await b.close()
    assert mallory <= 6, engine.released[:12]


async def test_a_request_gone_before_its_head_was_told_leaves_no_tag_on_the_siblings(
        ) -> None:
    """A request cancelled before its worker's pump told it as the head had told its tag:
    the sibling, idle, kept the tenant 50,000 tokens behind into its next busy period
    (nothing ever told it that the busy period had ended)."""
    engine, a, b = two_workers(free=0, hold_s=10.0)
    t0 = asyncio.create_task(request(a, engine, "t0", "t", tokens=50_000))
    await asyncio.sleep(0)              # queued and its tag told; the pump not yet run
    await cancel(t0)
    await settle_until(lambda: a.depth(MODEL) == 0 and not b.busy(MODEL), "t0 to be gone")
    await one_seat_for(b, engine, ("t1", "t", 10), ("u1", "u", 20))
    await a.close()
    await b.close()
    assert engine.released == ["t1"], "t paid for a request that never went"


def test_a_requests_charge_is_finite_however_many_tokens_it_says() -> None:
    """A tag is the sum of a request's tokens over its tenant's weight: one of 1e308
    tokens made the tenant's next tag infinite, which no sibling can be told."""
    q = fair_queue.FairQueue(fair_queue.Options())
    loop = asyncio.new_event_loop()
    try:
        for _ in range(3):
            w = q.push("m", "interactive", 1e-9, 10**308, 0.0, loop.create_future())
        assert math.isfinite(w.finish) and w.finish > w.start
        assert q.settle("m", "interactive", 1e-9, 10**308, 10**400) is None
        assert all(math.isfinite(t) for t in q.last_tags(0).values())
    finally:
        loop.close()


# -- reviewer-111's findings: a sibling's head is a request, told until its deadline ------

@pytest.mark.parametrize("every_s", [1.0, 100.0])   # 100: no settle before bob may go
async def test_a_sibling_head_retold_with_a_new_tag_does_not_restart_the_grace(
        every_s: float) -> None:
    """B's view has no room, A's has; B's head (alice) comes first. Alice has other
    requests in flight that settle about once a second (here on A): each re-tags her
    waiting request on B, B tells its head again with the new tag, and A started the
    grace afresh each time: bob waited until his deadline with four seats free. The grace
    is the request's, re-tagged or not: bob goes after max_seat_hold_s and a few polls."""
    clock = ManualClock()
    view_a, view_b = Fleet(free=0), Fleet(free=0)
    a = moving_gate(view_a.room, Stallable(clock), deadline_s=8.0)
    b = moving_gate(view_b.room, Stallable(clock), deadline_s=8.0)
    bob, alice = await bob_then_alice(a, view_a, b, view_b, clock)
    view_a.free = 4
    a.wake(MODEL)
    start = clock.now
    next_settle = start + every_s
    try:
        for _ in range(20000):
            if bob.done():
                break
            if clock.now >= next_settle:
                # one of alice's earlier requests (charged 10, used 9) ended on A
                a.settle(MODEL, "alice", "interactive", 1.0, 10, 9)
                next_settle += every_s
            await asyncio.sleep(0.001)
        released_at = clock.now
        await asyncio.wait_for(bob, 5)      # a QueueTimeout at its deadline, before
    finally:
        await cancel(alice)
        if not bob.done():
            await cancel(bob)
        await a.close()
        await b.close()
    grace = 2.0 + pod_order.SIBLING_GRACE_POLLS * 0.05
    assert released_at - start < grace + 1.0, (released_at - start, view_a.released)


async def test_a_siblings_new_head_with_an_equal_tag_gets_its_own_grace() -> None:
    """B's head alice (four seats, tag 10) holds seats for max_seat_hold_s; A saw a seat
    free for her from the start. B then sends alice on, and its next head is carol, of
    another tenant and the same size, so of the same tag (common at the start of a busy
    period). A kept the room it saw for alice and ignored carol at once, and bob (1000)
    went before carol (10), against the pod's order: she gets a grace of her own."""
    clock = ManualClock()
    view_a, view_b = Fleet(free=0), Fleet(free=0)
    a = moving_gate(view_a.room, Stallable(clock), deadline_s=30.0)
    b = moving_gate(view_b.room, Stallable(clock), deadline_s=30.0)
    bob, alice = await bob_then_alice(a, view_a, b, view_b, clock, alice_sequences=4)
    carol = asyncio.create_task(request(b, view_b, "carol", "carol", tokens=10))
    view_a.free = 1             # A: a seat free all along (alice's grace starts)
    view_b.free = 1             # B: one of alice's four: she holds it for 2 s
    a.wake(MODEL)
    b.wake(MODEL)
    await settle_until(lambda: "alice" in view_b.released, "alice to go after holding")
    told_carol_at = clock.now
    view_b.free = 0             # B's view now has no room for carol
    try:
        await settle_until(lambda: bob.done() or clock.now - told_carol_at > 1.0,
                           "a second")
        assert not bob.done(), ("A passed carol, told "
                                f"{clock.now - told_carol_at:.2f}s before (her grace is 2.2 s)")
    finally:
        await cancel(carol, bob, alice)
        await a.close()
        await b.close()


class Woken:
    """A gate's siblings that count the wake-ups told them (nothing else is heard)."""

    def __init__(self) -> None:
        self.woken = 0

    def head(self, model: str, rank: int, tag: float, left_s: float, seq: int) -> None:
        return None

    def tagged(self, model: str, rank: int, tenant: str, start: float,
               charge: float) -> None:
        return None

    def clocked(self, model: str, rank: int, start: float) -> None:
        return None

    def shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        return None

    def woke(self, model: str) -> None:
        self.woken += 1


async def test_a_stalled_siblings_head_past_its_deadline_ends_the_busy_period() -> None:
    """Sibling B told its head and stalled with its connection open (it never tells that
    none waits). Once that head's deadline has passed it waits there no more, yet it kept
    A's tags of the old busy period (mallory's earlier large request counted against her
    next ones) and every settle on A still woke B."""
    clock = ManualClock()
    engine = Fleet(free=1)
    a = stopped_clock_gate(engine, clock, hold_s=2.0)
    siblings = Woken()
    a.siblings = siblings
    a.worker_index = 0
    a.sibling_head(object(), 1, MODEL, 1, 0.0, 1.0, 0)     # a batch head: never first
    await asyncio.wait_for(request(a, engine, "mallory-0", "mallory", tokens=1000), 5)
    clock.now += 2.0                                        # B's head is past its deadline
    await one_seat_for(a, engine, ("mallory-1", "mallory", 10), ("alice", "alice", 10))
    assert engine.released == ["mallory-0", "mallory-1"], "the old busy period's tags"
    siblings.woken = 0
    a.sibling_head(object(), 1, MODEL, 1, 0.0, 1.0, 0)
    a.wake(MODEL)
    assert siblings.woken == 1          # B's head waits: B is woken
    clock.now += 2.0
    a.wake(MODEL)
    await a.close()
    assert siblings.woken == 1, "woke a sibling whose head's deadline has passed"
