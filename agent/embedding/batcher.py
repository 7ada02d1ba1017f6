"""Natural ("continuous") micro-batching in front of one model: bounded, fair between
tenants, and callers who give up leave the queue.

* One worker runs one batch at a time. When the model is free, the next batch runs at
  once with whatever is queued, up to ``max_batch`` texts; callers who arrive while a
  batch runs queue up and form the next one. So a lone caller at an idle model waits for
  nothing, and under load batches fill up with no added wait. One batch at a time: the
  model already uses every core, and two concurrent calls would only contend.
* ``wait_s`` (optional, 0 by default) is an extra gathering window, used only after a
  batch that served several callers, for them to come back and share the next batch.
  ``bench.embedding --batch-wait-ms`` measures whether it buys anything on a machine.
* **Fair between tenants.** Tenants are adversaries: one must not starve another's
  semantic-cache lookups, nor make them wait for its own large calls. So each call is cut
  into pieces of at most ``max_batch`` texts that wait in its tenant's own queue (first
  come, first served within a tenant), and each batch is filled in rounds over the
  tenants with texts waiting, each taking an equal share of the room left in the batch;
  the next batch starts with the tenant after the last one served. A tenant's one-text
  call thus waits for the batch on the model and rides in the next one, however many
  texts other tenants have queued; what it cannot avoid is sharing that batch with them.
  The tenant comes from the calling task's context (:func:`tenant_scope`, which
  :mod:`agent.embedding.service` sets from the call's metadata), so the embedders between
  the service and this queue (in-process, tuned, TEI) need not carry it. Calls made with
  no tenant set, and the untrusted ones (``None``), each count as one tenant of their own.
  The price of the pieces: a large call is padded per batch rather than across the whole
  call (``bench.embedding`` shows no loss in-process), and behind TEI it goes out one
  batch of ``max_batch`` texts at a time (each as concurrent posts of TEI's client batch,
  :mod:`agent.embedding.tei`) instead of all at once.
* Bounded: ``max_queued`` texts waiting, per tenant and in all. A call that would take
  its tenant's queue over the bound is refused at once with
  :class:`~agent.embedding.errors.Overloaded` (nothing is queued), so a burst is shed
  instead of growing a queue nobody will live to see the end of. The bound on all
  tenants together refuses only a tenant that would then hold more than an equal share
  of it, so a tenant filling the queue sheds its own calls, not the others'. A call into
  its tenant's empty queue is taken, whatever its size: one call at the per-call limit
  runs, and no tenant can lock another out. What waits can go over the bound only by
  tenants holding less than an equal share each, or one call each.
* A hard cap on the whole queue, twice ``max_queued``, refuses any call that would take
  it past (a call into an empty queue is still taken, whatever its size). The tenants
  come from the call's metadata, which only a holder of the agent's credential can set
  (the control plane, or whoever holds its shared token): such a holder can name as
  many tenants as it likes, each with an empty queue, and without the cap would queue
  without end. Twice the bound because one tenant alone never holds more than the
  bound: however hard a single tenant overloads the model, the others keep at least
  the bound's worth of room, so a quiet tenant's call (up to the per-call limit, when
  that is no larger than the bound) still gets its turn. Only several tenants together,
  or invented ones, reach the cap, and then every tenant is refused until it drains.
* A caller who goes away (its gRPC call cancelled, e.g. the control plane's budget ran
  out) leaves the queue at once and the pieces of its call not yet on the model are never
  computed. A batch already on the model runs to the end; the answers of callers who left
  are dropped. A failed batch fails every call with a piece in it, and drops their
  pieces still waiting. So does a batch answered with a number of rows other than its
  number of texts (:class:`~agent.embedding.errors.EmbedderUnavailable`): split anyway,
  rows would land on other callers' texts, across tenants, or leave a call unresolved.
* An empty call resolves at once (no rows), queued behind nothing.

Waits go through :func:`synapse_common.clock.sleep` on the event loop's clock, so tests
can move time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
from collections.abc import Awaitable, Callable, Iterator

import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import errors
from synapse_common import aiotasks, clock

Tenant = str | None  # None: a caller whose tenant cannot be trusted

# The whole queue's hard cap, in ``max_queued``s (see the module docstring).
HARD_CAP_FACTOR = 2

_TENANT: contextvars.ContextVar[Tenant] = contextvars.ContextVar("embed_tenant", default="")


@contextlib.contextmanager
def tenant_scope(tenant: Tenant) -> Iterator[None]:
    """Calls submitted inside this block (and by tasks created in it) queue as ``tenant``'s."""
    token = _TENANT.set(tenant)
    try:
        yield
    finally:
        _TENANT.reset(token)


@dataclasses.dataclass(eq=False)  # compared by identity: the queue removes this very one
class _Call:
    texts: list[str]
    future: asyncio.Future[np.ndarray]
    tenant: Tenant
    taken: int = 0     # texts handed to batches so far (a prefix of ``texts``)
    filled: int = 0    # rows answered so far
    rows: np.ndarray | None = None

    @property
    def waiting(self) -> int:
        return len(self.texts) - self.taken

    def answer(self, start: int, vectors: np.ndarray) -> None:
        """Rows ``start…`` of the result; the call resolves once every row is in."""
        if self.future.done():  # the caller left, or an earlier piece failed
            return
        n = len(self.texts)
        if start == 0 and len(vectors) == n:  # the whole call in one piece: no copy
            self.future.set_result(vectors)
            return
        if self.rows is None:
            self.rows = np.empty((n, *vectors.shape[1:]), dtype=vectors.dtype)
        self.rows[start:start + len(vectors)] = vectors
        self.filled += len(vectors)
        if self.filled == n:
            self.future.set_result(self.rows)


@dataclasses.dataclass(frozen=True)
class _Piece:
    call: _Call
    start: int
    end: int

    @property
    def texts(self) -> list[str]:
        return self.call.texts[self.start:self.end]


class MicroBatcher:
    """Coalesces concurrent :meth:`submit` calls into batches for ``run``, one at a time,
    round-robin over tenants."""

    def __init__(self, run: Callable[[list[str]], Awaitable[np.ndarray]], max_batch: int,
                 wait_s: float, max_queued: int | None = None) -> None:
        self._run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_queued = max_queued
        self._queues: dict[Tenant, collections.deque[_Call]] = {}
        self._turns: collections.deque[Tenant] = collections.deque()  # tenants with texts waiting
        self._waiting: dict[Tenant, int] = {}  # texts waiting (not yet on the model), per tenant
        self._queued = 0  # ... in all
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._last_callers = 0  # calls served by the previous batch

    @classmethod
    def for_settings(cls, run: Callable[[list[str]], Awaitable[np.ndarray]],
                     cfg: EmbedderSettings) -> MicroBatcher:
        """The batcher ``embedder`` settings describe (``batch_wait_ms``, ``max_batch``,
        ``queue_max_texts``)."""
        return cls(run, cfg.max_batch, cfg.batch_wait_ms / 1000, cfg.queue_max_texts)

    @property
    def queued(self) -> int:
        """Texts waiting for the model, all tenants together."""
        return self._queued

    async def submit(self, texts: list[str]) -> np.ndarray:
        """The vectors of ``texts``, queued as the tenant of :func:`tenant_scope`."""
        if not texts:  # nothing to wait for; queued, it could wait behind a full share
            return np.empty((0, 0), dtype=np.float32)
        tenant = _TENANT.get()
        self._admit(tenant, len(texts))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="embed-batcher")
        call = _Call(texts, asyncio.get_running_loop().create_future(), tenant)
        self._enqueue(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            self._withdraw(call)
            raise

    async def close(self) -> None:
        await aiotasks.stop(self._worker)

    def _admit(self, tenant: Tenant, count: int) -> None:
        limit = self.max_queued
        if limit is None:
            return
        if self._queued and self._queued + count > HARD_CAP_FACTOR * limit:
            # tenants named without end would each take a call into an empty queue
            raise errors.Overloaded("the embedder is busy (its queue is full); retry shortly")
        mine = self._waiting.get(tenant, 0)
        if not mine:  # a tenant's empty queue takes any call the whole queue has room for
            return
        if mine + count > limit:
            raise errors.Overloaded(f"the embedder is busy ({mine} texts queued, at most "
                                    f"{limit}); retry shortly")
        if self._queued + count > limit and mine + count > limit // len(self._turns):
            # the caller's own count only: the others' load is none of its business
            raise errors.Overloaded(f"the embedder is busy ({mine} texts queued for this "
                                    "caller, its share of the queue); retry shortly")

    def _enqueue(self, call: _Call) -> None:
        tenant = call.tenant
        if tenant not in self._waiting:
            self._waiting[tenant] = 0
            self._turns.append(tenant)
        self._queues.setdefault(tenant, collections.deque()).append(call)
        self._waiting[tenant] += len(call.texts)
        self._queued += len(call.texts)
        self._arrived.set()

    def _withdraw(self, call: _Call) -> None:
        """The caller left (or its call failed): drop the texts of it still waiting."""
        queue = self._queues.get(call.tenant)
        if queue is None or call not in queue:
            return
        queue.remove(call)
        self._uncount(call.tenant, call.waiting)
        call.taken = len(call.texts)

    def _uncount(self, tenant: Tenant, count: int) -> None:
        self._queued -= count
        self._waiting[tenant] -= count
        if not self._waiting[tenant]:
            del self._waiting[tenant]
            del self._queues[tenant]
            self._turns.remove(tenant)

    def _take(self, batch: list[_Piece], size: int) -> int:
        """Fill ``batch`` up to ``max_batch`` texts, round-robin over the tenants waiting."""
        while self._turns and size < self.max_batch:
            share = max(1, (self.max_batch - size) // len(self._turns))  # for this round
            for _ in range(len(self._turns)):
                if size >= self.max_batch:
                    break
                tenant = self._turns[0]
                self._turns.rotate(-1)  # its next turn comes after every other tenant's
                size += self._take_from(tenant, min(share, self.max_batch - size), batch)
        return size

    def _take_from(self, tenant: Tenant, share: int, batch: list[_Piece]) -> int:
        """Up to ``share`` texts from the head of ``tenant``'s queue, as pieces of its calls."""
        queue = self._queues[tenant]
        taken = 0
        while queue and taken < share:
            call = queue[0]
            end = call.taken + min(call.waiting, share - taken)
            batch.append(_Piece(call, call.taken, end))
            taken += end - call.taken
            call.taken = end
            if not call.waiting:
                queue.popleft()
        self._uncount(tenant, taken)
        return taken

    async def _gather(self) -> list[_Piece]:
        while not self._turns:
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Piece] = []
        size = self._take(batch, 0)
        if self.wait_s > 0 and self._last_callers > 1:
            await self._linger(batch, size)
        self._last_callers = len({id(piece.call) for piece in batch})
        return batch

    async def _linger(self, batch: list[_Piece], size: int) -> None:
        """Under load: wait up to ``wait_s`` for more callers to join ``batch``."""
        deadline = clock.loop_time() + self.wait_s
        while size < self.max_batch:
            if not self._turns:
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
            # a caller may leave while the batch lingers: its pieces are not run
            batch = [p for p in await self._gather() if not p.call.future.done()]
            if batch:
                await self._serve(batch)

    async def _serve(self, batch: list[_Piece]) -> None:
        texts = [t for piece in batch for t in piece.texts]
        try:
            vectors = await self._run(texts)
        except Exception as exc:
            self._fail(batch, exc)
            return
        if len(vectors) != len(texts):  # rows would land on other callers' texts
            self._fail(batch, errors.EmbedderUnavailable(
                f"the model returned {len(vectors)} rows for {len(texts)} texts"))
            return
        offset = 0
        for piece in batch:
            n = piece.end - piece.start
            piece.call.answer(piece.start, vectors[offset:offset + n])
            offset += n

    def _fail(self, batch: list[_Piece], exc: Exception) -> None:
        """Every call with a piece in the batch gets the failure; its pieces still waiting
        are dropped."""
        for piece in batch:
            if not piece.call.future.done():
                piece.call.future.set_exception(exc)
            self._withdraw(piece.call)


class Batched:
    """An embedder whose calls wait in its :class:`MicroBatcher`: ``queued`` is the
    batcher's."""

    batcher: MicroBatcher

    @property
    def queued(self) -> int:
        return self.batcher.queued
