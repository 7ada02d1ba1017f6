"""Priority classes and weighted fair queuing in front of saturated backends.

When the backends chosen for a request are saturated (every seat taken, or too much
prefill queued: :mod:`saturation`), the request waits here instead of in an engine's FIFO
queue, which knows nothing of tenants. One :class:`FairQueue` per model
(its backends are one pool; a saturated model never blocks another's requests):

* **Strict priority between classes** (``fairness.queue.classes``, highest first): a
  waiting request of a higher class always goes before any of a lower one.
* **Weighted fair queuing by tokens between tenants inside a class**: each request gets
  a virtual finish tag ``max(class clock, tenant's last tag) + tokens / weight`` and the
  smallest tag goes first; the class clock advances to the start tag of each request sent
  on. A tenant that floods only pushes its own tags into the future, so a quiet tenant's
  request is next in line whatever the flood's depth. Tokens, not requests, so that a
  tenant of long prompts does not get more of the fleet by sending fewer, larger ones.
* **Tags are settled** (:meth:`Gate.settle`): a request's tag is cut from its estimate
  (prompt + ``max_tokens``, or ``fairness.default_completion_tokens`` without one), so a
  tenant that sends no ``max_tokens`` and generates thousands of tokens would be charged a
  few hundred and take many times its share of the seats. When a released request ends,
  the difference between what it used and what it was charged moves its tenant's last
  tag and the tags of that tenant's requests still waiting in its class, as if the
  estimate had been right. A re-tag rebuilds that class's heap (linear in its waiting
  requests, bounded by ``max_waiting``), and only when the tenant has requests waiting.
* **Bounded**: ``max_waiting`` per model (503 above) and ``max_waiting_per_tenant`` (429
  above, so a flood fills its own share and never the quiet tenants').
* **A deadline per request**: at ``deadline_s`` it leaves with 503 and ``Retry-After``;
  nothing ever waits without one.
* **Dispatch as capacity frees** (:class:`Gate`): one pump task per non-empty queue sends
  the head on whenever ``room(model, class, seats)`` says the backends have room for all
  its seats again (``n`` x a batch's prompts: :mod:`saturation`) — woken by
  :meth:`Gate.wake` when a request of that model settles, and at ``poll_interval_s``
  otherwise (the engines' own reports move the prediction too). After releasing a
  request the pump waits until that request has resumed (and so been dispatched, which
  updates the router's ledger) before asking ``room`` again, so one freed slot releases
  one request, not the whole queue.
* **A head that needs more seats than are free holds them, for a bounded time**: while one
  seat is free but not all of a large request's, nothing behind it goes, so the seats that
  free gather for it instead of each going to a smaller request behind (which would let a
  stream of small requests pass it for ever). Other replicas fill freed seats too (a pod's
  workers do not: below) and may never leave enough free at once, so after
  ``max_seat_hold_s`` of holding it goes on with one seat free (the engine queues the
  rest), as if the rule were not there; so does a head whose deadline comes within a poll
  (else it would time out with a seat free); 0 turns the holding off. The holding time
  runs from the first time the head is found short with a seat free, whatever happens
  after (no seat free for a while, a higher class going first): a bound, not a budget. A
  request larger than the seats its class may take never fits while anything is in flight,
  so it goes with one seat free at once (:mod:`saturation`).
* **A pod queues as one**: the serving workers of a pod (``http.workers``) share what
  makes one order of their queues over the routing mesh, so a request's place is its class
  and tag across every worker's queue (:mod:`pod_order`: the rules and what each worker
  knows of its siblings' heads; the tag arithmetic stays here, :meth:`FairQueue.merge_tag`,
  :meth:`FairQueue.merge_clock`, :meth:`FairQueue.shift`). :class:`Gate` carries the
  mesh's events (``sibling_*``, :meth:`Gate.peer_gone`, :meth:`Gate.replay`) to both.

Pure apart from asyncio: the clock and the sleep are injected (:mod:`synapse_common.clock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from controlplane import errors
from controlplane.core import pod_order
from synapse_common import clock as clocks

Sleep = clocks.Sleep

# The most one request may move its tenant's tags (tokens over weight, and a settle's
# difference): validation bounds max_tokens, but a tag is the sum of what a request says
# and a weight an operator set, and one infinite or inexact tag would stall a class's
# order on every worker of the pod. Far above any real request; tags stay exact floats.
MAX_COST = float(2**50)


def cost(tokens: float, weight: float) -> float:
    """What a request of ``tokens`` moves its tenant's tags by, at ``weight``: finite,
    at least 1 token's worth and at most :data:`MAX_COST`."""
    return min(max(1.0, float(min(tokens, MAX_COST))) / weight, MAX_COST)


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    classes: tuple[str, ...] = ("interactive", "batch")
    max_waiting: int = 10_000
    max_waiting_per_tenant: int = 1000
    deadline_s: float = 30.0
    poll_interval_s: float = 0.05
    max_seat_hold_s: float = 2.0


class Observer(Protocol):
    def depth(self, model: str, cls: str, tenant: str, waiting: int) -> None: ...

    def waited(self, cls: str, tenant: str, seconds: float, outcome: str) -> None: ...


class NullObserver:
    def depth(self, model: str, cls: str, tenant: str, waiting: int) -> None:
        return None

    def waited(self, cls: str, tenant: str, seconds: float, outcome: str) -> None:
        return None


@dataclasses.dataclass(eq=False, slots=True)
class Waiter:
    tenant: str
    cls: str
    rank: int                   # the class's index: 0 is the highest priority
    start: float                # virtual start and finish tags (tokens / weight)
    finish: float
    seq: int
    enqueued_at: float
    deadline: float
    future: asyncio.Future[None]
    sequences: int = 1          # the seats it takes (:attr:`validation.Parsed.sequences`)
    holding_since: float | None = None   # first found at the head with too few seats
    taken: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    gone: bool = False          # released, expired or cancelled: skipped by pop


class FairQueue:
    """The waiting requests of one model, in dispatch order (no asyncio tasks here)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._ranks = {c: i for i, c in enumerate(options.classes)}
        self._heaps: list[list[tuple[float, int, Waiter]]] = [[] for _ in options.classes]
        self._clock_of: list[float] = [0.0] * len(options.classes)
        self._last: list[dict[str, float]] = [{} for _ in options.classes]
        self._waiting: dict[tuple[str, str], int] = {}     # (class, tenant) -> waiting
        self._count = 0
        self._seq = itertools.count()
        # A sibling worker of the pod has requests of this model waiting: the busy period
        # is the pod's, so the tags are kept when this worker's own queue empties.
        self.pinned = False

    def __len__(self) -> int:
        return self._count

    def waiting(self, cls: str, tenant: str) -> int:
        return self._waiting.get((cls, tenant), 0)

    def rank(self, cls: str) -> int:
        rank = self._ranks.get(cls)
        if rank is None:
            raise errors.BadRequest(f"unknown priority class {cls!r}; the classes are "
                                    f"{', '.join(self.options.classes)}", code="bad_priority")
        return rank

    def push(self, tenant: str, cls: str, weight: float, tokens: int, now: float,
             future: asyncio.Future[None], sequences: int = 1) -> Waiter:
        """Queue a request, or refuse it when a bound is reached."""
        rank = self.rank(cls)
        o = self.options
        mine = sum(n for (c, t), n in self._waiting.items() if t == tenant)
        if mine >= o.max_waiting_per_tenant:
            raise errors.QueueFull(
                f"tenant {tenant!r} already has {mine} requests waiting for this model's "
                f"saturated backends (fairness.queue.max_waiting_per_tenant)",
                retry_after_s=o.poll_interval_s * 20, limit="queue")
        if self._count >= o.max_waiting:
            raise errors.QueueTimeout(
                f"the backends are saturated and {self._count} requests are already waiting "
                "(fairness.queue.max_waiting); try again shortly",
                retry_after_s=o.poll_interval_s * 20)
        start = max(self._clock_of[rank], self._last[rank].get(tenant, 0.0))
        finish = start + cost(tokens, weight)
        self._last[rank][tenant] = finish
        w = Waiter(tenant, cls, rank, start, finish, next(self._seq), now,
                   now + o.deadline_s, future, sequences)
        heapq.heappush(self._heaps[rank], (finish, w.seq, w))
        self._count += 1
        self._waiting[(cls, tenant)] = self._waiting.get((cls, tenant), 0) + 1
        return w

    def settle(self, tenant: str, cls: str, weight: float, charged: int,
               used: int) -> float | None:
        """A released request of ``tenant`` in class ``cls`` was tagged for ``charged``
        tokens and used ``used``: move the tenant's last tag, and the tags of its requests
        waiting in that class, by the difference (over its weight); that shift, or None
        when nothing moved."""
        rank = self._ranks.get(cls)
        if rank is None or tenant not in self._last[rank]:
            return None     # an idle queue started afresh: nothing left to correct
        shift = cost(used, weight) - cost(charged, weight)
        if not shift:
            return None
        self.shift(rank, tenant, shift)
        return shift

    def shift(self, rank: int, tenant: str, shift: float) -> None:
        """Move ``tenant``'s last tag in class ``rank``, and its waiting requests' tags,
        by ``shift`` (a settle, here or on a sibling worker)."""
        if not 0 <= rank < len(self._last) or tenant not in self._last[rank]:
            return
        self._last[rank][tenant] += shift
        self._retag(rank, tenant, shift, -math.inf)

    def _retag(self, rank: int, tenant: str, shift: float, since: float) -> bool:
        """Move the tags of ``tenant``'s requests waiting in class ``rank`` that start at
        ``since`` or later by ``shift``; whether any did."""
        if not self._waiting.get((self.options.classes[rank], tenant)):
            return False
        heap = []
        moved = False
        for _, seq, w in self._heaps[rank]:
            if w.gone:
                continue
            if w.tenant == tenant and w.start >= since:
                w.start += shift
                w.finish += shift
                moved = True
            heap.append((w.finish, seq, w))
        heapq.heapify(heap)
        self._heaps[rank] = heap
        return moved

    def clock(self, rank: int) -> float:
        """Class ``rank``'s virtual clock: the start tag of the last request sent on."""
        return self._clock_of[rank]

    def last_tags(self, rank: int) -> dict[str, float]:
        """Each tenant's last finish tag in class ``rank`` (a copy)."""
        return dict(self._last[rank])

    def merge_clock(self, rank: int, start: float) -> None:
        """A sibling worker sent on a request of class ``rank`` that started at ``start``."""
        if 0 <= rank < len(self._clock_of):
            self._clock_of[rank] = max(self._clock_of[rank], start)

    def merge_tag(self, rank: int, tenant: str, start: float, charge: float,
                  before_mine: bool) -> bool:
        """A sibling worker queued a request of ``tenant`` in class ``rank`` that starts
        at ``start`` and moves the tenant's tags by ``charge``: the tenant's next request
        here starts after it, as in one queue. Sent as a charge, not a finish tag, so two
        requests queued at the same moment on two workers (each not yet told of the
        other's) add up on both: ``last = max(last, start) + charge`` in either order. With
        ``before_mine`` (the sibling's worker index is the smaller) the tenant's requests
        waiting here that start at ``start`` or later, which overlapped it, move after it
        too, as one queue would have tagged them; the other worker leaves its own where
        they are, so the overlap is charged once. Whether any waiting request moved."""
        if not 0 <= rank < len(self._last):
            return False
        last = self._last[rank]
        before = last.get(tenant, 0.0)
        last[tenant] = max(before, start) + charge
        if not before_mine or charge <= 0 or before <= start:
            return False    # nothing here starts at ``start`` or later: no overlap
        return self._retag(rank, tenant, charge, start)

    def reset_if_idle(self) -> None:
        """Start the next busy period from fresh tags when nothing waits here and no
        sibling's queue holds the period open (:attr:`pinned`)."""
        if not self._count and not self.pinned:
            self._clock_of = [0.0] * len(self._clock_of)
            self._last = [{} for _ in self._last]

    def peek(self, rank: int | None = None) -> Waiter | None:
        """The next request to send on, or with ``rank`` the next of that class or a higher
        one (smaller rank); released, expired and cancelled ones are dropped on the way."""
        heaps = self._heaps if rank is None else self._heaps[:rank + 1]
        for heap in heaps:
            while heap and heap[0][2].gone:
                heapq.heappop(heap)
            if heap:
                return heap[0][2]
        return None

    def waiting_at_or_above(self, rank: int) -> bool:
        """Whether a request of class rank ``rank`` or a higher class (smaller rank) waits."""
        return self.peek(rank) is not None

    def pop(self) -> Waiter | None:
        """The next request to send on: highest class, then smallest finish tag."""
        w = self.peek()
        if w is not None:
            heapq.heappop(self._heaps[w.rank])
            self._clock_of[w.rank] = max(self._clock_of[w.rank], w.start)
            self._forget(w)
        return w

    def remove(self, w: Waiter) -> None:
        if not w.gone:
            self._forget(w)

    def expired(self, now: float) -> list[Waiter]:
        out = [w for heap in self._heaps for _, _, w in heap if not w.gone and w.deadline <= now]
        for w in out:
            self._forget(w)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for heap in self._heaps for _, _, w in heap if not w.gone]
        return min(deadlines) if deadlines else None

    def _forget(self, w: Waiter) -> None:
        w.gone = True
        self._count -= 1
        key = (w.cls, w.tenant)
        self._waiting[key] -= 1
        if not self._waiting[key]:
            del self._waiting[key]
        self.reset_if_idle()    # idle: the next busy period starts from fresh tags


class Gate:
    """The queues of every model and their pumps."""

    def __init__(self, options: Options, room: Callable[[str, str, int], bool],
                 clock: clocks.Clock = clocks.loop_time, sleep: Sleep = clocks.sleep,
                 observer: Observer | None = None) -> None:
        self.options = options
        self._room = room
        self._clock = clock
        self._sleep = sleep
        self._observer = observer or NullObserver()
        self._queues: dict[str, FairQueue] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self.pod = pod_order.PodOrder(len(options.classes), options.deadline_s,
                                      options.max_seat_hold_s, options.poll_interval_s, clock)

    @property
    def siblings(self) -> pod_order.Siblings | None:
        """The pod's other workers (None: this is the only one; :mod:`pod_order`)."""
        return self.pod.siblings

    @siblings.setter
    def siblings(self, siblings: pod_order.Siblings | None) -> None:
        self.pod.siblings = siblings

    @property
    def worker_index(self) -> int:
        """This worker's index in the pod (breaks a tie of two heads' class and tag)."""
        return self.pod.worker_index

    @worker_index.setter
    def worker_index(self, index: int) -> None:
        self.pod.worker_index = index

    @property
    def classes(self) -> Sequence[str]:
        return self.options.classes

    def busy(self, model: str, cls: str | None = None) -> bool:
        """Whether requests of ``model`` are waiting — of class ``cls`` or a higher one,
        when given — here or on a sibling worker, so that a newcomer of that class queues
        behind them (and gets its place in the pod's order). Requests of lower classes
        only would go after it anyway (strict priority): it need not wait for a turn
        behind them."""
        rank = None if cls is None else self._rank(cls)
        if self._sibling_waits(model, rank):
            return True
        q = self._queues.get(model)
        if q is None or not len(q):
            return False
        return rank is None or q.waiting_at_or_above(rank)

    def _rank(self, cls: str) -> int:
        return self.options.classes.index(cls) if cls in self.options.classes else 0

    def _queue(self, model: str) -> FairQueue:
        q = self._queues.get(model)
        if q is None:
            q = self._queues[model] = FairQueue(self.options)
            q.pinned = self.pod.holds(model)
        return q

    # -- the pod's other workers (:mod:`pod_order`) ---------------------------------------

    def sibling_head(self, peer: object, index: int, model: str, rank: int, tag: float,
                     left_s: float, seq: int) -> None:
        """Sibling ``peer`` (worker ``index``) told its head of ``model``
        (:meth:`pod_order.PodOrder.heard`)."""
        self.pod.heard(peer, index, model, rank, tag, left_s, seq)
        self._pin(model)
        self._wake_local(model)     # the pod's order changed: this head may be first now

    def sibling_tagged(self, index: int, model: str, rank: int, tenant: str, start: float,
                       charge: float) -> None:
        """Sibling worker ``index`` queued a request (:meth:`FairQueue.merge_tag`)."""
        q = self._queue(model)
        if q.merge_tag(rank, tenant, start, charge, index < self.worker_index):
            self._wake_local(model)     # a re-tagged head is told by the pump

    def sibling_clocked(self, model: str, rank: int, start: float) -> None:
        self._queue(model).merge_clock(rank, start)

    def sibling_shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        q = self._queues.get(model)
        if q is not None:
            q.shift(rank, tenant, shift)
            self._wake_local(model)     # a re-tagged head is told by the pump

    def sibling_woke(self, model: str) -> None:
        self._wake_local(model)

    def peer_gone(self, peer: object) -> None:
        """Sibling ``peer``'s connection ended: what it told with it."""
        for model in self.pod.told_by(peer):
            self.sibling_head(peer, 0, model, 0, 0.0, 0.0, -1)
        for model in self._queues:      # tags it told with no head (cut off between them)
            self._pin(model)

    def replay(self, to: pod_order.Siblings) -> None:
        """Tell ``to`` (a sibling that has just joined) the tags and heads of this
        worker's waiting requests."""
        for model, q in self._queues.items():
            head = q.peek()
            if head is None:
                continue
            for rank in range(len(self.options.classes)):
                to.clocked(model, rank, q.clock(rank))
                for tenant, tag in q.last_tags(rank).items():
                    to.tagged(model, rank, tenant, tag, 0.0)
            to.head(model, head.rank, head.finish, self.pod.left(head), head.seq)

    def _pin(self, model: str) -> None:
        """Keep ``model``'s tags while a sibling has requests of it waiting; once none
        has, and none waits here, the pod's busy period is over."""
        pinned = self.pod.holds(model)
        q = self._queues.get(model)
        if q is not None:
            q.pinned = pinned
            q.reset_if_idle()

    def _drop_expired_heads(self, model: str) -> None:
        """Forget the siblings' heads of ``model`` past their deadline
        (:meth:`pod_order.PodOrder.drop_expired`), and with the last of them the pod's
        busy period."""
        if self.pod.drop_expired(model):
            self._pin(model)

    def _sibling_waits(self, model: str, rank: int | None) -> bool:
        self._drop_expired_heads(model)
        return self.pod.waits(model, rank)

    def _sibling_first(self, model: str, head: Waiter) -> float | None:
        self._drop_expired_heads(model)
        classes = self.options.classes
        return self.pod.first(model, head, lambda rank: self._room(model, classes[rank], 1))

    def depths(self) -> dict[str, int]:
        """Requests waiting per model (models with none left out)."""
        return {m: len(q) for m, q in self._queues.items() if len(q)}

    def depth(self, model: str) -> int:
        q = self._queues.get(model)
        return len(q) if q is not None else 0

    async def wait(self, model: str, tenant: str, cls: str, weight: float,
                   tokens: int, sequences: int = 1) -> float:
        """Wait for the turn of a request of ``model`` (``sequences``: the seats it
        takes, which ``room`` is asked for); the seconds waited. Raises
        :class:`errors.QueueFull` / :class:`errors.QueueTimeout` (deadline)."""
        self._drop_expired_heads(model)     # their busy period may be over: fresh tags
        q = self._queue(model)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        w = q.push(tenant, cls, weight, tokens, self._clock(), future, sequences)
        self.pod.queued(model, w.rank, tenant, w.start, w.finish - w.start)
        self._observer.depth(model, cls, tenant, q.waiting(cls, tenant))
        self._ensure_pump(model)
        if q.peek() is w:       # a new head (e.g. a higher class, with seats kept for it)
            self._wake_local(model)     # may go at once: no waiting for the next poll
        try:
            await future
        except asyncio.CancelledError:          # the client went away
            q.remove(w)
            self._wake_local(model)     # the pump tells the siblings of the next head
            self._observer.depth(model, cls, tenant, q.waiting(cls, tenant))
            self._observer.waited(cls, tenant, self._clock() - w.enqueued_at, "cancelled")
            raise
        finally:
            w.taken.set()
        waited = self._clock() - w.enqueued_at
        self._observer.waited(cls, tenant, waited, "dispatched")
        return waited

    def settle(self, model: str, tenant: str, cls: str, weight: float, charged: int,
               used: int) -> None:
        """A request that waited here (``charged``: the tokens it was queued with) ended
        having used ``used`` tokens (prompt + completion, the engine's usage): its tenant's
        tags pay the difference (:meth:`FairQueue.settle`), here and on the siblings.
        Call it for released requests only; one that never waited was never charged."""
        q = self._queues.get(model)
        if q is None:
            return
        shift = q.settle(tenant, cls, weight, charged, used)
        if shift is not None:
            self.pod.shifted(model, q.rank(cls), tenant, shift)

    def wake(self, model: str) -> None:
        """Capacity may have freed for ``model`` (a request settled): this worker's pump
        looks again, and so do the siblings' that have requests of it waiting."""
        self._wake_local(model)
        if self.siblings is not None:
            self._drop_expired_heads(model)
            self.pod.woke(model)

    def _wake_local(self, model: str) -> None:
        event = self._wakeups.get(model)
        if event is not None:
            event.set()

    def _ensure_pump(self, model: str) -> None:
        task = self._pumps.get(model)
        if task is None or task.done():
            self._wakeups[model] = asyncio.Event()
            self._pumps[model] = asyncio.get_running_loop().create_task(self._pump(model))

    async def _pump(self, model: str) -> None:
        q = self._queues[model]
        wakeup = self._wakeups[model]
        try:
            while len(q):
                self._expire(model, q)
                head = q.peek()
                if head is None:
                    break
                if head.future.done():          # cancelled, its handler not yet resumed
                    q.remove(head)
                    continue
                # Told only now: after the request sent on before it has been dispatched
                # (its seats are in the siblings' ledgers before they hear of the next).
                self.pod.tell_head(model, q.peek())
                sibling_until = self._sibling_first(model, head)
                if sibling_until is None and self._may_go(model, head):
                    q.pop()
                    self.pod.clocked(model, head.rank, q.clock(head.rank))
                    self._observer.depth(model, head.cls, head.tenant,
                                         q.waiting(head.cls, head.tenant))
                    head.future.set_result(None)
                    await head.taken.wait()     # it resumes and dispatches before we look
                    continue
                wakeup.clear()
                now = self._clock()
                wakes = [t for t in (q.next_deadline(), sibling_until,
                                     self._held_until(head)) if t is not None and t > now]
                delay = min([self.options.poll_interval_s, *(t - now for t in wakes)])
                await self._sleep(max(0.0, delay), wakeup)
        finally:
            self.pod.tell_head(model, q.peek())

    def _held_until(self, head: Waiter) -> float | None:
        """When the head's holding ends (it then goes with one seat free)."""
        if head.holding_since is None:
            return None
        return head.holding_since + self.options.max_seat_hold_s

    def _may_go(self, model: str, head: Waiter) -> bool:
        """Room for all the head's seats, or for one once it has held them as long as it
        may or its deadline is near (the module's docstring)."""
        if self._room(model, head.cls, head.sequences):
            return True
        if head.sequences == 1 or not self._room(model, head.cls, 1):
            return False
        now = self._clock()
        if head.holding_since is None:
            head.holding_since = now
        return (now - head.holding_since >= self.options.max_seat_hold_s
                or now + self.options.poll_interval_s >= head.deadline)

    def _expire(self, model: str, q: FairQueue) -> None:
        for w in q.expired(self._clock()):
            self._observer.depth(model, w.cls, w.tenant, q.waiting(w.cls, w.tenant))
            self._observer.waited(w.cls, w.tenant, self._clock() - w.enqueued_at, "timeout")
            if not w.future.done():
                w.future.set_exception(errors.QueueTimeout(
                    f"the backends of this model stayed saturated for "
                    f"{self.options.deadline_s:g}s (fairness.queue.deadline_s); try again "
                    "shortly", retry_after_s=self.options.deadline_s / 4))

    async def close(self) -> None:
        for task in self._pumps.values():
            task.cancel()
        for task in self._pumps.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pumps.clear()
