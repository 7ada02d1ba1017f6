"""Natural ("continuous") micro-batching in front of one model: bounded, and callers who
give up leave the queue.

* One worker runs one batch at a time. When the model is free, the next batch runs at
  once with whatever is queued, up to ``max_batch`` texts; callers who arrive while a
  batch runs queue up and form the next one. So a lone caller at an idle model waits for
  nothing, and under load batches fill up with no added wait. One batch at a time: the
  model already uses every core, and two concurrent calls would only contend.
* ``wait_s`` (optional, 0 by default) is an extra gathering window, used only after a
  batch that served several callers, for them to come back and share the next batch.
  ``bench.embedding --batch-wait-ms`` measures whether it buys anything on a machine.
* Bounded: at most ``max_queued`` texts wait. A call that would go over is refused at
  once with :class:`~agent.embedding.errors.Overloaded` (nothing is queued), so a burst
  is shed instead of growing a queue nobody will live to see the end of. A call into an
  empty queue is always taken, whatever its size, so one call at the per-call limit runs.
* A caller who goes away (its gRPC call cancelled, e.g. the control plane's budget ran
  out) leaves the queue at once and its texts are never computed. A batch already on the
  model runs to the end; the answers of callers who left are dropped.

Waits go through :func:`synapse_common.clock.sleep` on the event loop's clock, so tests
can move time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable

import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import errors
from synapse_common import aiotasks, clock


@dataclasses.dataclass(eq=False)  # compared by identity: the queue removes this very one
class _Pending:
    texts: list[str]
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """Coalesces concurrent :meth:`submit` calls into batches for ``run``, one at a time."""

    def __init__(self, run: Callable[[list[str]], Awaitable[np.ndarray]], max_batch: int,
                 wait_s: float, max_queued: int | None = None) -> None:
        self._run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_queued = max_queued
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued = 0  # texts waiting (not yet on the model)
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._last_callers = 0  # callers served by the previous batch

    @classmethod
    def for_settings(cls, run: Callable[[list[str]], Awaitable[np.ndarray]],
                     cfg: EmbedderSettings) -> MicroBatcher:
        """The batcher ``embedder`` settings describe (``batch_wait_ms``, ``max_batch``,
        ``queue_max_texts``)."""
        return cls(run, cfg.max_batch, cfg.batch_wait_ms / 1000, cfg.queue_max_texts)

    @property
    def queued(self) -> int:
        """Texts waiting for the model."""
        return self._queued

    async def submit(self, texts: list[str]) -> np.ndarray:
        self._admit(len(texts))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="embed-batcher")
        item = _Pending(texts, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._queued += len(texts)
        self._arrived.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._withdraw(item)
            raise

    async def close(self) -> None:
        await aiotasks.stop(self._worker)

    def _admit(self, count: int) -> None:
        limit = self.max_queued
        if limit is not None and self._queued and self._queued + count > limit:
            raise errors.Overloaded(f"the embedder is busy ({self._queued} texts queued, at "
                                    f"most {limit}); retry shortly")

    def _withdraw(self, item: _Pending) -> None:
        """The caller left: drop its texts if they are still waiting."""
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a batch
            return
        self._queued -= len(item.texts)

    def _take(self, batch: list[_Pending], size: int) -> int:
        """Move queued callers into ``batch`` while it is under ``max_batch`` texts."""
        while self._queue and (not batch or size < self.max_batch):
            item = self._queue.popleft()
            self._queued -= len(item.texts)
            batch.append(item)
            size += len(item.texts)
        return size

    async def _gather(self) -> list[_Pending]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Pending] = []
        size = self._take(batch, 0)
        if self.wait_s > 0 and self._last_callers > 1:
            await self._linger(batch, size)
        self._last_callers = len(batch)
        return batch

    async def _linger(self, batch: list[_Pending], size: int) -> None:
        """Under load: wait up to ``wait_s`` for more callers to join ``batch``."""
        deadline = clock.loop_time() + self.wait_s
        while size < self.max_batch:
            if not self._queue:
                remaining = deadline - clock.loop_time()
                if remaining <= 0:
                    return
                self._arrived.clear()
                if await clock.sleep(remaining, self._arrived) is None:
                    return  # the window ended with nobody new
                continue
            size = self._take(batch, size)

    async def _work(self) -> None:
        while True:
            batch = [item for item in await self._gather() if not item.future.done()]
            if batch:
                await self._serve(batch)

    async def _serve(self, batch: list[_Pending]) -> None:
        texts = [t for item in batch for t in item.texts]
        try:
            vectors = await self._run(texts)
        except Exception as exc:  # every caller of the batch gets the failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        offset = 0
        for item in batch:
            n = len(item.texts)
            if not item.future.done():
                item.future.set_result(vectors[offset:offset + n])
            offset += n


class Batched:
    """An embedder whose calls wait in its :class:`MicroBatcher`: ``queued`` is the
    batcher's."""

    batcher: MicroBatcher

    @property
    def queued(self) -> int:
        return self.batcher.queued
