"""What the fair queue's tests share: a stand-in fleet of seats, gates on it (one worker's,
or a pod's workers joined as the mesh joins them), requests that wait in them, and waits
for a condition (never a fixed sleep)."""

from __future__ import annotations

import asyncio

from controlplane.core import fair_queue
from tests.clock import ManualClock

MODEL = "m"


class Fleet:
    """Backends with ``free`` dispatch slots: a released request takes one."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.released: list[str] = []

    def room(self, model: str, cls: str, sequences: int = 1) -> bool:
        return self.free >= sequences


def gate_for(fleet: Fleet, clock: ManualClock | None = None, **options: object,
             ) -> fair_queue.Gate:
    opts = fair_queue.Options(**{"poll_interval_s": 0.01, **options})  # type: ignore[arg-type]
    if clock is None:
        return fair_queue.Gate(opts, fleet.room)

    async def sleep(seconds: float | None, wakeup: asyncio.Event | None) -> float | None:
        clock.now += seconds or 0.0
        await asyncio.sleep(0)
        return None
    return fair_queue.Gate(opts, fleet.room, clock=clock, sleep=sleep)


async def request(gate: fair_queue.Gate, fleet: Fleet, name: str, tenant: str,
                  cls: str = "interactive", weight: float = 1.0, tokens: int = 100,
                  sequences: int = 1) -> None:
    await gate.wait(MODEL, tenant, cls, weight, tokens, sequences)
    fleet.free -= sequences         # dispatched: it holds its slots
    fleet.released.append(name)


async def settle_until(predicate: object, what: str) -> None:
    for _ in range(2000):
        if predicate():             # type: ignore[operator]
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


async def cancel(*tasks: asyncio.Task[None]) -> None:
    """Cancel waiting requests and let each one end (and leave the queue)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def stopped_clock_gate(fleet: Fleet, clock: ManualClock, hold_s: float,
                       deadline_s: float = 30.0) -> fair_queue.Gate:
    """A gate whose pump polls in real time while its clock moves only when the test
    moves it: the holding and the deadlines are measured on that clock alone."""
    async def sleep(seconds: float | None, wakeup: asyncio.Event | None) -> float | None:
        await asyncio.sleep(0.001)
        return None
    options = fair_queue.Options(poll_interval_s=0.01, max_seat_hold_s=hold_s,
                                 deadline_s=deadline_s)
    return fair_queue.Gate(options, fleet.room, clock=clock, sleep=sleep)


class Told:
    """A gate's siblings behind a stand-in mesh: what it tells reaches the other gates at
    once, in order."""

    def __init__(self, me: fair_queue.Gate, others: list[fair_queue.Gate]) -> None:
        self._me, self._others = me, others

    def head(self, model: str, rank: int, tag: float, left_s: float, seq: int) -> None:
        for g in self._others:
            g.sibling_head(self._me, self._me.worker_index, model, rank, tag, left_s, seq)

    def tagged(self, model: str, rank: int, tenant: str, start: float,
               charge: float) -> None:
        for g in self._others:
            g.sibling_tagged(self._me.worker_index, model, rank, tenant, start, charge)

    def clocked(self, model: str, rank: int, start: float) -> None:
        for g in self._others:
            g.sibling_clocked(model, rank, start)

    def shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        for g in self._others:
            g.sibling_shifted(model, rank, tenant, shift)

    def woke(self, model: str) -> None:
        for g in self._others:
            g.sibling_woke(model)


def joined(*gates: fair_queue.Gate) -> None:
    """The gates of one pod's workers (0, 1, ...), each told what the others tell, as the
    mesh tells them."""
    for i, g in enumerate(gates):
        g.worker_index = i
        g.siblings = Told(g, [o for o in gates if o is not g])
