"""Seats held for a large request at the head of the fair queue: through a real control
plane's wiring, and across the serving workers of one pod (their holds travel over the
routing mesh)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from controlplane.api import app as app_mod
from controlplane.api import fairness_wiring
from controlplane.core import pod_order, shared_routing
from tests import harness
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t
from tests.controlplane.fair_queue_testing import (
    MODEL,
    Fleet,
    joined,
    request,
    settle_until,
    stopped_clock_gate,
)
from tests.controlplane.test_shared_routing import Worker


@contextlib.asynccontextmanager
async def four_seats(hold_s: float) -> AsyncIterator[tuple[t.RunningCP, t.FakeBackend]]:
    """A control plane whose one upstream runs 4 sequences at once and never answers."""
    fair = {"queue": {"enabled": True, "max_queue_wait_s": 1000.0, "poll_interval_s": 0.02,
                      "max_seat_hold_s": hold_s, "deadline_s": 60.0}}
    async with t.backends(("one", "hang")) as (backend,):
        s = t.settings(upstreams=[{**t.upstream("one", backend.url), "max_num_seqs": 4}],
                       fairness=fair, registry={"upstream_probe_interval_s": 5.0})
        async with t.running(s) as cp:
            await harness.until(lambda: app_mod.routable_count(cp.services) > 0, 20,
                                "the backend")
            yield cp, backend


@contextlib.asynccontextmanager
async def three_of_four_taken() -> AsyncIterator[
        tuple[t.RunningCP, t.FakeBackend, Callable[[str, int], asyncio.Task[None]],
              list[asyncio.Task[None]]]]:
    """:func:`four_seats` with three of them taken by requests that never end; yields the
    control plane, the engine, a way to send a chat of ``n`` as a task, and the three."""
    async with four_seats(hold_s=30.0) as (cp, backend):
        async with aiohttp.ClientSession(headers={
                "Authorization": f"Bearer {t.KEY_A}"}) as session:
            tasks: list[asyncio.Task[None]] = []

            def send(text: str, n: int = 1) -> asyncio.Task[None]:
                task = asyncio.create_task(_chat(session, cp.url, text, n))
                tasks.append(task)
                return task
            held = [send(f"seat {i}") for i in range(3)]
            await harness.until(lambda: len(backend.bodies) == 3, 10, "three seats taken")
            try:
                yield cp, backend, send, held
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_request_of_two_sequences_waits_for_two_free_seats() -> None:
    """With three of four seats taken, a request of n: 2 waits, holding the free seat,
    and goes when a second one frees (before, it went at once and overfilled)."""
    async with three_of_four_taken() as (cp, backend, send, held):
        gate = fairness_wiring.get(cp.services).gate
        assert gate is not None
        send("two seats", 2)
        await harness.until(lambda: gate.depth(t.MODEL) == 1, 10, "the large one to queue")
        await asyncio.sleep(0.3)
        assert len(backend.bodies) == 3 and gate.depth(t.MODEL) == 1
        held[0].cancel()                # a second seat frees
        await harness.until(lambda: len(backend.bodies) == 4, 10, "the large one to go")
        assert json.loads(backend.bodies[-1])["n"] == 2


async def test_a_request_larger_than_the_engine_goes_with_one_seat_free() -> None:
    """Eight sequences never fit four seats while anything is in flight: holding for them
    would only idle the seats that free, so one free seat will do."""
    async with three_of_four_taken() as (_, backend, send, _):
        send("eight seats", 8)
        await harness.until(lambda: len(backend.bodies) == 4, 10, "the large one to go")


async def _chat(session: aiohttp.ClientSession, url: str, text: str, n: int) -> None:
    async with session.post(f"{url}/v1/chat/completions", json={
            "model": "llama", "n": n, "messages": [{"role": "user", "content": text}]}) as resp:
        await resp.read()


async def test_a_sibling_leaves_the_seats_a_workers_head_holds() -> None:
    """Two workers of a pod share one engine: while worker A's large head holds seats,
    worker B sends nothing of that model on that comes after it in the pod's order (B
    filled every seat that freed before), and queues its newcomers; B's higher class
    still goes."""
    clock = ManualClock()
    engine = Fleet(free=0)                       # one engine, both workers' view of it
    a = stopped_clock_gate(engine, clock, hold_s=10.0)
    b = stopped_clock_gate(engine, clock, hold_s=10.0)
    joined(a, b)
    big = asyncio.create_task(request(a, engine, "big", "x", cls="batch", sequences=2))
    await settle_until(lambda: a.depth(MODEL) == 1, "the large request to queue")
    engine.free = 1
    a.wake(MODEL)
    await settle_until(lambda: MODEL in b.pod._heads, "B to hear of A's head")
    assert b.busy(MODEL, "batch") and not b.busy(MODEL, "interactive")
    small = asyncio.create_task(request(b, engine, "small", "y", cls="batch"))
    await asyncio.sleep(0.05)
    assert engine.released == [] and not small.done(), "B took the seat A holds"
    urgent = asyncio.create_task(request(b, engine, "urgent", "z", cls="interactive"))
    await asyncio.wait_for(urgent, 5)           # a higher class is not held back
    assert engine.released == ["urgent"]
    engine.free += 2
    a.wake(MODEL)
    await asyncio.wait_for(big, 5)
    engine.free += 1
    a.wake(MODEL)
    await asyncio.wait_for(small, 5)            # A's hold ended: B goes on
    assert engine.released == ["urgent", "big", "small"]
    await a.close()
    await b.close()


async def test_a_siblings_head_ends_when_it_goes_away_or_its_time_is_up() -> None:
    clock = ManualClock()
    engine = Fleet(free=1)
    b = stopped_clock_gate(engine, clock, hold_s=10.0)
    peer = object()
    b.sibling_head(peer, 0, MODEL, 1, 0.0, 5.0, 0)  # it comes first: class 1, tag 0
    small = asyncio.create_task(request(b, engine, "small", "y", cls="batch"))
    await asyncio.sleep(0.05)
    assert not small.done()
    b.peer_gone(peer)
    await asyncio.wait_for(small, 5)
    b.sibling_head(peer, 0, MODEL, 1, 0.0, 5.0, 1)  # and again, never ended by a word
    engine.free = 1
    late = asyncio.create_task(request(b, engine, "late", "y", cls="batch"))
    await asyncio.sleep(0.05)
    assert not late.done()
    clock.now += 5.0
    await asyncio.wait_for(late, 5)
    await b.close()


async def test_a_head_near_its_deadline_goes_with_one_seat_rather_than_time_out() -> None:
    """A hold that began late in a request's wait ended in a 503 with a seat free."""
    clock = ManualClock()
    engine = Fleet(free=0)
    gate = stopped_clock_gate(engine, clock, hold_s=0.5, deadline_s=1.0)
    big = asyncio.create_task(request(gate, engine, "big", "x", sequences=2))
    await settle_until(lambda: gate.depth(MODEL) == 1, "the large request to queue")
    clock.now += 0.995                          # within a poll of its deadline
    engine.free = 1
    gate.wake(MODEL)
    await asyncio.wait_for(big, 5)
    assert engine.released == ["big"]
    await gate.close()


class Queues:
    """Stands in for a gate behind the mesh: what it was told (and what it replays)."""

    def __init__(self) -> None:
        self.siblings: Any = None
        self.worker_index = -1
        self.told: list[tuple[Any, ...]] = []

    def sibling_head(self, peer: object, index: int, model: str, rank: int, tag: float,
                     left_s: float, seq: int) -> None:
        self.told.append(("head", index, model, rank, tag, left_s, seq))

    def sibling_tagged(self, index: int, model: str, rank: int, tenant: str, start: float,
                       charge: float) -> None:
        self.told.append(("tagged", index, model, rank, tenant, start, charge))

    def sibling_clocked(self, model: str, rank: int, start: float) -> None:
        self.told.append(("clocked", model, rank, start))

    def sibling_shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        self.told.append(("shifted", model, rank, tenant, shift))

    def sibling_woke(self, model: str) -> None:
        self.told.append(("woke", model))

    def peer_gone(self, peer: object) -> None:
        self.told.append(("gone",))

    def replay(self, to: pod_order.Siblings) -> None:
        to.clocked("m", 0, 7.0)
        to.head("m", 0, 9.5, 3.0, 4)


def test_the_queues_order_travels_over_the_mesh_and_ends_with_the_connection() -> None:
    sender, receiver = Queues(), Queues()
    w0, w1 = Worker(0, ManualClock()), Worker(1, ManualClock())
    s0 = shared_routing.Sharing(w0.router, w0.pins, 0, "a", queues=sender)
    s1 = shared_routing.Sharing(w1.router, w1.pins, 1, "b", queues=receiver)
    s0.attach(lambda: None)
    s1.attach(lambda: None)
    assert sender.siblings is s0 and sender.worker_index == 0
    inbound = s1.inbound()
    inbound.feed(s0.greeting())                 # what waits there when the peer joins
    sender.siblings.tagged("m", 1, "alice", 100.0, 20.0)
    sender.siblings.head("m", 1, 120.0, 1.5, 5)
    sender.siblings.clocked("m", 1, 100.0)
    sender.siblings.shifted("m", 1, "alice", -20.0)
    sender.siblings.woke("m")
    sender.siblings.head("m", 0, 0.0, 0.0, -1)
    frame = s0.take()
    assert frame is not None
    inbound.feed(frame)
    inbound.close()
    assert receiver.told == [
        ("clocked", "m", 0, 7.0), ("head", 0, "m", 0, 9.5, 3.0, 4),
        ("tagged", 0, "m", 1, "alice", 100.0, 20.0), ("head", 0, "m", 1, 120.0, 1.5, 5),
        ("clocked", "m", 1, 100.0), ("shifted", "m", 1, "alice", -20.0), ("woke", "m"),
        ("head", 0, "m", 0, 0.0, 0.0, -1), ("gone",)]
    s0.detach()
    assert sender.siblings is None
