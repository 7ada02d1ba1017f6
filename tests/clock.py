"""A clock tests move by hand: ``clock.now += 5`` and every reader sees five seconds pass;
and a sleeper that moves it (for code taking ``clock`` and ``sleep`` as
:mod:`synapse_common.clock` does), so waits for a deadline, a retry or a stall take no
wall time and tests assert their exact length."""

from __future__ import annotations

import asyncio
import heapq
import itertools

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


class VirtualTime:
    """Virtual seconds for components with several loops that wait at once (looptime-style):
    no time passes until the test calls :meth:`advance`, which moves the clock to each due
    sleeper's deadline in turn and lets it run before going on. ``time`` is the
    :class:`synapse_common.clock.Time` to inject; ``due`` the deadlines of the sleepers now
    waiting, so a test asserts when each would wake without waiting for any of them."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.time = clocks.Time(wall=self, monotonic=self, sleep=self.sleep)

    def __call__(self) -> float:
        return self.now

    def due(self) -> list[float]:
        return sorted(d for d, _, f in self._sleepers if not f.done())

    async def sleep(self, seconds: float | None,
                    wakeup: asyncio.Event | None = None) -> float | None:
        if wakeup is None and seconds is None:
            raise ValueError("sleep(None) without a wakeup event would never return")
        if wakeup is not None and wakeup.is_set():
            return seconds if seconds is not None else 0.0
        deadline = None if seconds is None else self.now + max(0.0, seconds)
        due: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if deadline is not None:
            heapq.heappush(self._sleepers, (deadline, next(self._order), due))
        woken = None if wakeup is None else asyncio.ensure_future(wakeup.wait())
        try:
            await (due if woken is None else asyncio.wait({due, woken},
                                                           return_when=asyncio.FIRST_COMPLETED))
        finally:
            if woken is not None:
                woken.cancel()
            due.cancel()        # a sleeper woken early leaves no deadline behind
        if due.cancelled() and woken is not None and woken.done() and not woken.cancelled():
            return 0.0 if deadline is None else max(0.0, deadline - self.now)
        return None

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: each sleeper due by then wakes at its own deadline."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, due = heapq.heappop(self._sleepers)
            if due.done():
                continue
            self.now = deadline
            due.set_result(None)
            await settle(20)
        self.now = target
        await settle(20)


async def settle(turns: int = 50) -> None:
    """Let the tasks just woken run until they wait again (``turns`` turns of the loop; no
    time passes on any clock)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def stepped_time(now: float = 0.0) -> tuple[clocks.Time, ManualClock, SteppedSleep]:
    """A component's whole time on one hand-driven clock (``wall`` and ``monotonic`` read
    it; every sleep moves it): the :class:`synapse_common.clock.Time` to inject, the
    clock to move, the sleep whose ``calls`` tell the exact waits."""
    clock = ManualClock(now)
    sleep = SteppedSleep(clock)
    return clocks.Time(wall=clock, monotonic=clock, sleep=sleep), clock, sleep
