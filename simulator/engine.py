"""The async engine loop: runs ``Scheduler`` steps in (scaled) real time.

One background task repeats: plan a step, let its modelled duration x ``time_scale``
elapse, apply it, wake the handlers whose sequences progressed. It sleeps on an event
while there is no work.

Time keeping: step ends are scheduled against a running deadline (previous end +
scaled duration) rather than with independent sleeps, so timer granularity (about 1 ms
in the event loop) does not accumulate into drift at small time scales. After an idle
period the deadline restarts from now.

``time_scale == 0`` never sleeps: each step yields to the event loop once
(``clock.sleep(0)``) so that new requests join the running batch between steps.

Handlers wait through :class:`Handle`: non-streaming ones only for the end, streaming
ones for each step in which their sequence gained a token.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from simulator import metrics as sim_metrics
from simulator import scheduler as sched
from synapse_common import aiotasks
from synapse_common import clock as clocks

log = logging.getLogger("simulator.engine")


class Handle:
    """A handler's view of one request's sequences: await progress or completion."""

    __slots__ = ("_waiter", "seqs", "stream")

    def __init__(self, seqs: list[sched.Seq], stream: bool) -> None:
        self.seqs = seqs
        self.stream = stream
        self._waiter: asyncio.Future[None] | None = None
        for seq in seqs:
            # Non-streaming handlers only care about the end: no per-token wake-up calls.
            if stream:
                seq.on_progress = self._progress
            else:
                seq.on_done = self._progress

    def _progress(self, seq: sched.Seq) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self.stream or self.done:
            waiter.set_result(None)

    @property
    def done(self) -> bool:
        return all(seq.state is sched.State.FINISHED for seq in self.seqs)

    @property
    def aborted(self) -> bool:
        return any(seq.finish_reason == "abort" for seq in self.seqs)

    async def wait(self) -> None:
        """Until a sequence progresses (streaming) or all have finished."""
        if self.done:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


def exit_process() -> None:
    # A dead engine loop would leave every request waiting forever; vLLM's API server
    # exits when its engine dies, and so does the simulator (a supervisor restarts it).
    os._exit(1)


class Engine:
    def __init__(self, scheduler: sched.Scheduler, metrics: sim_metrics.VllmMetrics,
                 time_scale: float, clock: Callable[[], float],
                 on_fatal: Callable[[], None] = exit_process) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.time_scale = time_scale
        self.clock = clock
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_fatal = on_fatal
        scheduler.on_finish = metrics.observe_finished

    def submit(self, seqs: list[sched.Seq], stream: bool) -> Handle:
        handle = Handle(seqs, stream)
        for seq in seqs:
            self.scheduler.add(seq)
        self._idle.clear()
        self._wake.set()
        return handle

    def abort(self, handle: Handle) -> None:
        """Drop every unfinished sequence of a request (client gone, fault)."""
        for seq in handle.seqs:
            self.scheduler.abort(seq)

    def abort_all(self) -> int:
        """Abort every running and waiting sequence (shutdown); returns how many."""
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        for seq in seqs:
            self.scheduler.abort(seq)
        return len(seqs)

    @property
    def busy(self) -> bool:
        return self.scheduler.has_work

    async def wait_idle(self) -> None:
        """Until no sequence is running or waiting."""
        while self.busy:
            await self._idle.wait()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="simulator-engine")
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        log.critical("engine loop failed, exiting", exc_info=task.exception())
        self._on_fatal()

    async def stop(self) -> None:
        await aiotasks.stop(self._task)

    async def _run(self) -> None:
        deadline = self.clock()
        while True:
            if not self.scheduler.has_work:
                self._idle.set()
                self._wake.clear()
                idle_from = self.clock()
                await self._wake.wait()
                deadline = self.clock()
                if self.time_scale > 0:
                    self.metrics.simulated_seconds += (deadline - idle_from) / self.time_scale
            plan = self.scheduler.schedule()
            self.metrics.simulated_seconds += plan.duration
            if self.time_scale > 0 and plan.duration > 0:
                deadline = max(deadline, self.clock() - 0.05) + plan.duration * self.time_scale
                delay = deadline - self.clock()
                await clocks.sleep(delay)
            else:
                await clocks.sleep(0)
            self._complete(plan)

    def _complete(self, plan: sched.StepPlan) -> None:
        now = self.clock()
        ttft, itl = self.metrics.ttft, self.metrics.itl
        before = [(seq, seq.last_token) for seq, _ in plan.scheduled]
        self.scheduler.complete(plan)
        for seq, last in before:
            if seq.last_token is None or seq.last_token == last:
                continue
            if last is None:
                ttft.observe(now - seq.arrival)
            else:
                itl.observe(now - last)
