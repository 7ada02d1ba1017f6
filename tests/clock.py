"""A clock tests move by hand: ``clock.now += 5`` and every reader sees five seconds pass;
and a sleeper that moves it (for code taking ``clock`` and ``sleep`` as
:mod:`synapse_common.clock` does), so waits for a deadline, a retry or a stall take no
wall time and tests assert their exact length."""

from __future__ import annotations

import asyncio

from synapse_common import clock as clocks


class ManualClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SteppedSleep:
    """``await sleep(s)`` moves ``clock`` forward by ``s`` and records ``s`` in ``calls``,
    so timeouts run out without waiting and tests can assert the exact waits. It still
    yields to the event loop, for ``scale * s`` real seconds (0: one turn), so a loop
    that sleeps between passes neither spins nor starves the I/O it waits for."""

    def __init__(self, clock: ManualClock, scale: float = 0.0) -> None:
        self.clock = clock
        self.scale = scale
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.now += seconds
        await asyncio.sleep(seconds * self.scale)


def stepped_time(now: float = 0.0) -> tuple[clocks.Time, ManualClock, SteppedSleep]:
    """A component's whole time on one hand-driven clock (``wall`` and ``monotonic`` read
    it; every sleep moves it): the :class:`synapse_common.clock.Time` to inject, the
    clock to move, the sleep whose ``calls`` tell the exact waits."""
    clock = ManualClock(now)
    sleep = SteppedSleep(clock)
    return clocks.Time(wall=clock, monotonic=clock, sleep=sleep), clock, sleep
