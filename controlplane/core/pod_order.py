"""The pod's one order over its serving workers' fair queues (:mod:`fair_queue`).

The serving workers of a pod (``http.workers``) each have their queues, and each would
otherwise order and release its own requests as if alone: a quiet tenant's small request
on one worker waited while a sibling sent on a large request of a later turn the moment
seats freed there, or held them for it. So the workers share what makes one order of their
queues (:attr:`PodOrder.siblings`, over the routing mesh: :mod:`shared_routing`):

* a request's start tag and charge when it queues (:meth:`PodOrder.queued`; each worker
  adds the charge to the tenant's last tag: :meth:`fair_queue.FairQueue.merge_tag`), a
  class's clock when one is sent on (each worker takes the larger:
  :meth:`fair_queue.FairQueue.merge_clock`), a settled request's re-tag
  (:meth:`fair_queue.FairQueue.shift`), and each worker's head (which request, its class
  and finish tag, until its deadline: :meth:`PodOrder.tell_head`, :meth:`PodOrder.heard`).
* A worker's head goes only when no sibling's head comes before it (higher class, or the
  same class and a smaller tag; equal tags by worker index), exactly as the one head of a
  single queue would (:meth:`PodOrder.first`): so a large head on one worker holds the
  seats that free against the other workers' requests of later turns too, and a small
  request of an earlier turn passes it, wherever each came in.
* A sibling's head stops this worker's only while the sibling may still be sending it on:
  once a seat has been free here for that request for its seat holding and a few polls
  (:attr:`PodOrder.grace_s`), it no longer counts, re-tagged or not, so a stalled sibling,
  or one whose view of the backends differs, costs a bounded wait, not its deadline.
* While a sibling has requests of a model waiting (its head's deadline not passed), a
  newcomer of their class or a lower one queues (for its place in the order:
  :meth:`PodOrder.waits`), and the tags of the busy period are kept when this worker's own
  queue empties (:meth:`PodOrder.holds`, :attr:`fair_queue.FairQueue.pinned`; else a
  stream of small requests there would start afresh each time and pass a sibling's large
  one for ever); a sibling's head past its deadline is forgotten
  (:meth:`PodOrder.drop_expired`), a stalled sibling's too.
* A request settling wakes the siblings' pumps with requests of that model waiting
  (:meth:`PodOrder.woke`), as it wakes this worker's, and a worker tells its next head only
  once the request sent on before it has been dispatched (its seats are then in the
  siblings' ledgers). The exchange happens only while requests wait; a connection's heads
  end with it (:meth:`PodOrder.told_by`) and a new one starts with what waits
  (``Gate.replay``).
* Two requests of a tenant queued at the same moment on two workers (each hears of the
  other's a moment later) are ordered as one queue would order them: the one on the worker
  of the larger index moves after the other. ``max_waiting`` and
  ``max_waiting_per_tenant`` are each worker's. Other replicas are not told: they see the
  engine's reports only.

The split: :class:`fair_queue.FairQueue` holds a worker's tags and the arithmetic on them
(the sibling's tags and clocks merge there); :class:`PodOrder` holds what this worker knows
of its siblings' heads and what it told them of its own, and decides whether a sibling's
head comes first; :class:`fair_queue.Gate` (the pump) asks it and carries the mesh's events
to both. No asyncio and no queues here: the clock is injected (:mod:`synapse_common.clock`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol

from synapse_common import clock as clocks

SIBLING_GRACE_POLLS = 4


class Siblings(Protocol):
    """The pod's other serving workers, told over the routing mesh (:mod:`shared_routing`)
    what makes this worker's queue of a model and theirs one order."""

    def head(self, model: str, rank: int, tag: float, left_s: float, seq: int) -> None:
        """This worker's first waiting request of ``model`` is request ``seq`` (its number
        in this worker's queue of the model) of class ``rank`` with finish tag ``tag`` and
        waits ``left_s`` more at most; ``left_s`` <= 0: none waits."""

    def tagged(self, model: str, rank: int, tenant: str, start: float,
               charge: float) -> None:
        """A request of ``tenant`` queued in class ``rank`` starting at ``start`` and
        charged ``charge`` (its finish tag less its start; 0 in a greeting's replay of
        the tenant's last tag)."""

    def clocked(self, model: str, rank: int, start: float) -> None:
        """Class ``rank``'s virtual clock moved to ``start`` (a request sent on)."""

    def shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        """A request of ``tenant`` settled: its tags move by ``shift``."""

    def woke(self, model: str) -> None:
        """Capacity may have freed for ``model`` (a request settled here)."""


class Head(Protocol):
    """This worker's first waiting request of a model (:class:`fair_queue.Waiter`)."""

    rank: int
    finish: float
    seq: int
    deadline: float


@dataclasses.dataclass(slots=True)
class SiblingHead:
    """A sibling worker's first waiting request of a model, as told."""

    rank: int
    tag: float
    index: int                  # the sibling's worker index (breaks a tie of tags)
    until: float                # its deadline, by this worker's clock
    seq: int                    # which request it is (Waiter.seq, on the sibling)
    room_since: float | None = None     # this worker first saw room for it (it came first)


class PodOrder:
    """This worker's part of the pod's order: its siblings' heads of each model as told,
    and what it told them (the module's docstring)."""

    def __init__(self, ranks: int, deadline_s: float, max_seat_hold_s: float,
                 poll_interval_s: float, clock: clocks.Clock) -> None:
        self._ranks = ranks
        self._deadline_s = deadline_s
        self._clock = clock
        # How long a sibling's head that comes first may leave a seat free here: its seat
        # holding, and a few polls for its pump to notice and its dispatch to be heard.
        self.grace_s = max_seat_hold_s + SIBLING_GRACE_POLLS * poll_interval_s
        # The pod's other workers (None: this is the only one) and this worker's index
        # among them, which breaks a tie between two heads of equal class and tag.
        self.siblings: Siblings | None = None
        self.worker_index = 0
        self._told: dict[str, tuple[int, int, float]] = {}   # model -> the head told
        # models whose tags were told with no head told since (a "none" resets them)
        self._untold: set[str] = set()
        self._heads: dict[str, dict[object, SiblingHead]] = {}

    # -- what the siblings told ---------------------------------------------------------

    def heard(self, peer: object, index: int, model: str, rank: int, tag: float,
              left_s: float, seq: int) -> None:
        """Sibling ``peer`` (worker ``index``)'s first waiting request of ``model`` is its
        request ``seq``, of class ``rank`` with finish tag ``tag``, for ``left_s`` more at
        most; ``left_s`` <= 0: none waits there."""
        heads = self._heads.setdefault(model, {})
        if left_s > 0 and 0 <= rank < self._ranks and math.isfinite(tag):
            old = heads.get(peer)
            # The same request told again (re-tagged by a settle or an overlap, or in a
            # greeting) keeps the room seen for it, so its grace is the request's, not its
            # tag's; another request is another head, though its tag be equal.
            seen = old.room_since if old is not None and old.seq == seq else None
            until = self._clock() + min(left_s, self._deadline_s)
            heads[peer] = SiblingHead(rank, tag, index, until, seq, seen)
        else:
            heads.pop(peer, None)

    def told_by(self, peer: object) -> list[str]:
        """The models sibling ``peer`` has a head of (its connection ended: they go)."""
        return [model for model, heads in self._heads.items() if peer in heads]

    def holds(self, model: str) -> bool:
        """Whether a sibling has requests of ``model`` waiting: its busy period holds this
        worker's tags of it (:attr:`fair_queue.FairQueue.pinned`)."""
        heads = self._heads.get(model)
        if heads is not None and not heads:
            del self._heads[model]
        return model in self._heads

    def drop_expired(self, model: str) -> bool:
        """Forget the siblings' heads of ``model`` whose deadline has passed: none waits
        there any more (its pump expired it, or its event loop is stuck with the
        connection open and tells nothing), and one kept this worker's tags of an old
        busy period (:meth:`holds`) and its wake-ups to the siblings going for ever.
        Whether any was forgotten."""
        heads = self._heads.get(model)
        if not heads:
            return False
        now = self._clock()
        expired = [peer for peer, h in heads.items() if h.until <= now]
        for peer in expired:
            del heads[peer]
        return bool(expired)

    def waits(self, model: str, rank: int | None) -> bool:
        """Whether a sibling has a request of ``model`` waiting of class ``rank`` or a
        higher one (any class: None)."""
        heads = self._heads.get(model)
        if not heads:
            return False
        now = self._clock()
        return any(h.until > now and (rank is None or h.rank <= rank)
                   for h in heads.values())

    def first(self, model: str, head: Head, room: Callable[[int], bool]) -> float | None:
        """Until when a sibling's head comes before ``head`` in the pod's order (class,
        then finish tag, then worker index: as one queue would order them); None when
        none does. ``room(rank)``: whether one seat of class ``rank`` is free here.

        A sibling's head that comes first stops this worker's only while the sibling may
        still be sending it on: once this worker has seen a seat free for it for
        :attr:`grace_s` (a sibling's head goes within a poll of a seat freeing, or holds
        seats for at most ``max_seat_hold_s``), it no longer counts until the sibling
        tells another head. Else a sibling whose event loop stalls with its connection
        open, or whose view of the backends has no room (eligibility and the learned seat
        limits are each process's), would keep free seats idle on every other worker
        until its head's deadline."""
        heads = self._heads.get(model)
        if not heads:
            return None
        now = self._clock()
        mine = (head.rank, head.finish, self.worker_index)
        first = None
        for h in heads.values():
            if h.until <= now or (h.rank, h.tag, h.index) >= mine:
                continue
            if h.room_since is None and room(h.rank):
                h.room_since = now
            ends = h.until if h.room_since is None else min(h.until, h.room_since + self.grace_s)
            if ends > now:
                first = ends if first is None else min(first, ends)
        return first

    # -- what this worker tells ---------------------------------------------------------

    def left(self, head: Head) -> float:
        """How long ``head`` may wait yet (as told: a duration, never a clock reading)."""
        return max(1e-6, head.deadline - self._clock())

    def queued(self, model: str, rank: int, tenant: str, start: float, charge: float) -> None:
        """A request queued here; the pump tells the siblings of a new head."""
        if self.siblings is not None:
            self.siblings.tagged(model, rank, tenant, start, charge)
            self._untold.add(model)

    def tell_head(self, model: str, head: Head | None) -> None:
        """Tell the siblings when this worker's head of ``model`` changes (a new one, a
        re-tag, or none left)."""
        siblings = self.siblings
        if siblings is None:
            return
        told = self._told.get(model)
        if head is None:
            if told is not None or model in self._untold:
                # "none": also after tags told with no head (a request gone before the
                # pump's first pass), so the siblings' idle queues forget them
                self._told.pop(model, None)
                self._untold.discard(model)
                siblings.head(model, 0, 0.0, 0.0, -1)
            return
        self._untold.discard(model)
        now = (head.seq, head.rank, head.finish)     # another request, or a re-tag
        if now != told:
            self._told[model] = now
            siblings.head(model, head.rank, head.finish, self.left(head), head.seq)

    def clocked(self, model: str, rank: int, clock: float) -> None:
        """A request of class ``rank`` was sent on here: the class's clock is ``clock``."""
        if self.siblings is not None:
            self.siblings.clocked(model, rank, clock)

    def shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        """A request settled here and moved its tenant's tags by ``shift``."""
        if self.siblings is not None:
            self.siblings.shifted(model, rank, tenant, shift)

    def woke(self, model: str) -> None:
        """Capacity may have freed for ``model``: the siblings with requests of it
        waiting look again (call :meth:`drop_expired` first)."""
        if self.siblings is not None and model in self._heads:
            self.siblings.woke(model)
