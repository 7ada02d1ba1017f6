"""The router's per-request state shared between the worker processes of one pod (pure).

With ``http.workers`` > 1 every worker routes its own share of the pod's requests, and a
router that saw only its own dispatches would split the pod's view N ways: each worker's
ledger would see a backend 1/N as busy as it is, and a prompt's cached prefix, a
session's backend or a stored Responses answer would be known to one worker only. So each
worker tells its siblings what it records, and applies what they record, as if it had
dispatched it itself:

* its ledger's tickets (:class:`ledger.Listener`): a peer's dispatch becomes a *foreign*
  ticket in this worker's :class:`ledger.Ledger` (``Ledger.dispatch``), moved by the
  peer's first byte and finish. A whole answer's foreign ticket turns to decoding at the
  predicted first token by this worker's clock, as an own one would. Foreign tickets never
  reach ``Router.observe``: costs are learned from a worker's own answers only;
* the prefix index's inserts and the sessions' backends (:class:`router.Listener`);
* the Responses pins (:attr:`response_pins.Pins.listener`);
* what each answer taught the router about its backend's costs
  (:attr:`costs.CostModel.listener`), so every worker learns from all the pod's answers,
  not from its own share, and all predict alike;
* the response cache's served log (:attr:`served_log.ServedLog.listener`), when the
  cache takes feedback: which entry answered which request id, so ``POST
  /v1/cache/feedback`` may reach any process of the pod, and an id judged on one is
  forgotten by all (one verdict per request);
* the stream form the response cache learnt for a model, tenant and endpoint kind
  (:class:`Forms`, keyed by ``response_cache.form_key``), so an answer stored from a plain
  request replays as the model streams on every process, not only on the one that saw a
  stream of it;
* the response cache's invalidations (the Admin API reaches one process): each sibling
  drops its own copies (L2's mirror, the coalescer's landed answers) and voids the stores
  of its lookups made before (``TieredCache.forget``; the shared stores were emptied by
  the process that was asked);
* the fair queue's order (:class:`Queues`), so that the pod's queues of a model are one
  (:mod:`pod_order`): each worker's first waiting request (its class, finish tag and
  number in that worker's queue), each request's start tag and charge as it queues, each
  class's virtual clock as one is sent on, a settled request's re-tag, and a wake-up when a
  request settles on a worker (sent only to siblings with requests of that model waiting).
  Heads, tags and clocks travel only while requests wait (the queue is engaged), and the
  greeting replays them (a tenant's last tag as a charge of 0). Times travel as durations
  (the head's time left), never as one process's clock readings. A connection's heads end
  with it. A number that is not finite is never sent, and one of these events a worker
  cannot take is skipped (logged), not its connection: they are hints the sender tells
  again, and dropping the connection would void its tickets here while its greeting
  replayed the same value.

Foreign tickets belong to the connection they came in on (an :class:`Inbound`), not to the
peer's index: when a connection ends (the peer died, closed, or was dropped as too slow)
:meth:`Inbound.close` finishes all of them, so nothing leaks in the ledger, and a peer that
comes back on a new connection cannot have its new tickets finished by the old connection's
end, whatever order the two reach this worker in. On every new connection a worker first
sends a *greeting*: who it is and every ticket it has in flight (what a peer that just
started, or just lost it, does not know), and, for each model with requests waiting, the
fair queue's clocks, tenants' last tags and its head (``Queues.replay``). A ticket that is
both in a greeting and in the events right after it is counted once (a peer's ids are
unique per connection). Prefix inserts, sessions and pins are not replayed: they are hints,
relearned from the next dispatches. A replayed whole answer waits its full predicted first
token again on the peer (a slight overcount of its prefill, bounded by that prediction).

Wire format: a frame is a 4-byte big-endian length and an orjson array of events, a flush
(once per event-loop turn) sending one frame per :data:`FRAME_EVENTS`, each event an array
whose first item says what it is (``H`` for the constants below). No pickle: a frame is
data, never code. Prefix hashes travel as JSON integers (64-bit, unsigned).

Hot path: a hook appends a tuple to the outbox (and asks the transport for a flush when
the outbox was empty); encoding happens at the flush, once for every peer.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from controlplane.core import ledger as ledger_mod
from controlplane.core import pod_order, response_pins, served_log
from controlplane.core import router as router_mod

VERSION = 6         # 2: a pin names its tenant; 3: a dispatch its sequences;
                    # 4: the fair queue's order (heads, tags, clocks) instead of holds;
                    # 5: a tag is a start and a charge; 6: a head says which request
MAX_FRAME = 256 * 1024 * 1024   # bytes; a longer frame means a broken peer
FRAME_EVENTS = 256              # events per frame at most, so a burst stays far below it

HELLO = "h"         # ("h", version, worker index, incarnation): first event of a connection
DISPATCH = "d"      # ("d", id, backend, uncached tokens, prompt tokens, streams, expect_s,
                    #  sequences)
FIRST_BYTE = "f"    # ("f", id)
FINISH = "x"        # ("x", id)
PREFIX = "p"        # ("p", backend, [block hashes], capacity blocks, restarts)
SESSION = "s"       # ("s", session, backend)
PIN = "r"           # ("r", tenant, response id, backend)
SERVED = "v"        # ("v", request id, *the Served fields in order)
COST = "c"          # ("c", backend, *the rest of CostModel.observe's arguments in order)
FORM = "m"          # ("m", form key (tenant, model, endpoint kind), the form learnt for it)
HEAD = "q"          # ("q", model, class rank, finish tag, seconds left; 0 left: none waits,
                    #  the request's number in the sender's queue of the model)
TAG = "g"           # ("g", model, class rank, tenant, start tag, charge)
CLOCK = "k"         # ("k", model, class rank, the class's virtual clock)
SHIFT = "z"         # ("z", model, class rank, tenant, shift of its tags)
WAKE = "w"          # ("w", model): a request of it settled
TAKEN = "t"         # ("t", tenant, request id)
INVALIDATED = "i"   # ("i", tenant or null, model or null): the response cache invalidated

Event = tuple[Any, ...]

log = logging.getLogger("synapse.controlplane.mesh")


class FrameError(ValueError):
    """A peer sent something this worker cannot read: its connection should be dropped."""


class Refused(FrameError):
    """A peer's first event is not a hello of this :data:`VERSION` (a rolling restart
    runs two releases side by side): ``hello`` is what it said it was."""

    def __init__(self, message: str, hello: str) -> None:
        super().__init__(message)
        self.hello = hello


def frame(events: Sequence[Event]) -> bytes:
    """``events`` as one frame: length, then the orjson array."""
    payload = orjson.dumps(events)
    return len(payload).to_bytes(4, "big") + payload


class Forms(Protocol):
    """The response cache's stream forms (:class:`response_cache.TieredCache`)."""

    form_listener: Callable[[str, Mapping[str, Any]], None] | None
    invalidation_publisher: Callable[[str | None, str | None], None] | None

    def learn_form(self, key: str, form: Mapping[str, Any]) -> bool: ...

    def forget(self, tenant: str | None, model: str | None) -> None: ...


class Queues(Protocol):
    """The fair queue (:class:`fair_queue.Gate`): its order shared with the siblings'."""

    siblings: pod_order.Siblings | None
    worker_index: int

    def sibling_head(self, peer: object, index: int, model: str, rank: int, tag: float,
                     left_s: float, seq: int) -> None: ...

    def sibling_tagged(self, index: int, model: str, rank: int, tenant: str, start: float,
                       charge: float) -> None: ...

    def sibling_clocked(self, model: str, rank: int, start: float) -> None: ...

    def sibling_shifted(self, model: str, rank: int, tenant: str, shift: float) -> None: ...

    def sibling_woke(self, model: str) -> None: ...

    def peer_gone(self, peer: object) -> None: ...

    def replay(self, to: pod_order.Siblings) -> None: ...


class _Recorded:
    """The fair queue's state as events (:meth:`Queues.replay`, for a greeting)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def head(self, model: str, rank: int, tag: float, left_s: float, seq: int) -> None:
        self.events.append((HEAD, model, rank, tag, left_s, seq))

    def tagged(self, model: str, rank: int, tenant: str, start: float,
               charge: float) -> None:
        self.events.append((TAG, model, rank, tenant, start, charge))

    def clocked(self, model: str, rank: int, start: float) -> None:
        self.events.append((CLOCK, model, rank, start))

    def shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        self.events.append((SHIFT, model, rank, tenant, shift))

    def woke(self, model: str) -> None:
        self.events.append((WAKE, model))


class Sharing:
    """This worker's side of the mesh: the listener of its ledger, router and pins, and
    the one that applies its peers' events to them.

    :meth:`attach` installs the listeners with ``wake``, called when the outbox goes from
    empty to not empty (the transport then flushes :meth:`take` soon after);
    :meth:`detach` removes them. While events from a peer are applied the listeners stay
    silent, so nothing is echoed back.
    """

    def __init__(self, router: router_mod.Router, pins: response_pins.Pins, index: int,
                 incarnation: str, served: served_log.ServedLog | None = None,
                 forms: Forms | None = None, queues: Queues | None = None) -> None:
        self.router = router
        self.ledger = router.ledger
        self.pins = pins
        self.served_log = served
        self.forms = forms
        self.queues = queues
        self.index = index
        self.incarnation = incarnation    # tells this process from a restarted one (logs)
        self._outbox: list[Event] = []
        self._wake: Callable[[], None] | None = None
        self._ids = itertools.count()
        # own tickets in flight, by id: their dispatch event, for the greeting
        self._live: dict[int, tuple[Event, ledger_mod.Ticket]] = {}
        self._applying = False

    # -- installed in the ledger, router and pins --------------------------------------

    def attach(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.ledger.listener = self
        self.router.listener = self
        self.pins.listener = self.pinned
        self.router.costs.listener = self.observed
        if self.served_log is not None:
            self.served_log.listener = self
        if self.forms is not None:
            self.forms.form_listener = self.formed
            self.forms.invalidation_publisher = self.invalidated
        if self.queues is not None:
            self.queues.siblings = self
            self.queues.worker_index = self.index

    def detach(self) -> None:
        self.ledger.listener = None
        self.router.listener = None
        self.pins.listener = None
        self.router.costs.listener = None
        if self.served_log is not None:
            self.served_log.listener = None
        if self.forms is not None:
            self.forms.form_listener = None
            self.forms.invalidation_publisher = None
        if self.queues is not None:
            self.queues.siblings = None
        self._wake = None
        self._outbox.clear()
        self._live.clear()      # their finishes would no longer be heard: not kept

    def _publish(self, event: Event) -> None:
        if not self._outbox and self._wake is not None:
            self._wake()
        self._outbox.append(event)

    def dispatched(self, ticket: ledger_mod.Ticket, uncached_tokens: int, prompt_tokens: int,
                   streams: bool, expect_s: float) -> None:
        if self._applying:
            return
        ticket.seq = seq = next(self._ids)
        event = (DISPATCH, seq, ticket.backend, uncached_tokens, prompt_tokens, streams,
                 expect_s, ticket.sequences)
        self._live[seq] = (event, ticket)
        self._publish(event)

    def first_byte(self, ticket: ledger_mod.Ticket) -> None:
        if ticket.seq >= 0 and not self._applying:
            self._publish((FIRST_BYTE, ticket.seq))

    def finished(self, ticket: ledger_mod.Ticket) -> None:
        if ticket.seq >= 0 and not self._applying:
            self._live.pop(ticket.seq, None)
            self._publish((FINISH, ticket.seq))

    def prefix(self, backend: str, hashes: Sequence[int], capacity_blocks: int,
               restarts: int) -> None:
        if not self._applying:
            self._publish((PREFIX, backend, hashes, capacity_blocks, restarts))

    def session(self, session: str, backend: str) -> None:
        if not self._applying:
            self._publish((SESSION, session, backend))

    def pinned(self, tenant: str, response_id: str, backend: str) -> None:
        if not self._applying:
            self._publish((PIN, tenant, response_id, backend))

    def observed(self, backend: str, ttft_s: float, queued_tokens: float,
                 uncached_tokens: float, decode_wait_s: float, stream_s: float,
                 output_tokens: int, error_s: float) -> None:
        if not self._applying:
            self._publish((COST, backend, ttft_s, queued_tokens, uncached_tokens,
                           decode_wait_s, stream_s, output_tokens, error_s))

    def served(self, request_id: str, served: served_log.Served) -> None:
        if not self._applying:
            self._publish((SERVED, request_id, *dataclasses.astuple(served)))

    def taken(self, tenant: str, request_id: str) -> None:
        if not self._applying:
            self._publish((TAKEN, tenant, request_id))

    def formed(self, key: str, form: Mapping[str, Any]) -> None:
        if not self._applying:
            self._publish((FORM, key, dict(form)))

    def invalidated(self, tenant: str | None, model: str | None) -> None:
        if not self._applying:
            self._publish((INVALIDATED, tenant, model))

    # the fair queue's order (pod_order.Siblings)

    # A number that is not finite is never sent: JSON has no such value (orjson writes
    # null), and a sibling could not read the event (_finite).

    def head(self, model: str, rank: int, tag: float, left_s: float, seq: int) -> None:
        if not self._applying and _finite(HEAD, model, tag, left_s):
            self._publish((HEAD, model, rank, tag, left_s, seq))

    def tagged(self, model: str, rank: int, tenant: str, start: float,
               charge: float) -> None:
        if not self._applying and _finite(TAG, model, start, charge):
            self._publish((TAG, model, rank, tenant, start, charge))

    def clocked(self, model: str, rank: int, start: float) -> None:
        if not self._applying and _finite(CLOCK, model, start):
            self._publish((CLOCK, model, rank, start))

    def shifted(self, model: str, rank: int, tenant: str, shift: float) -> None:
        if not self._applying and _finite(SHIFT, model, shift):
            self._publish((SHIFT, model, rank, tenant, shift))

    def woke(self, model: str) -> None:
        if not self._applying:
            self._publish((WAKE, model))

    # -- what goes out ------------------------------------------------------------------

    def take(self) -> bytes | None:
        """The events published since the last call, as one frame (None: nothing new)."""
        if not self._outbox:
            return None
        events, self._outbox = self._outbox, []
        if len(events) <= FRAME_EVENTS:
            return frame(events)
        return b"".join(frame(events[i:i + FRAME_EVENTS])
                        for i in range(0, len(events), FRAME_EVENTS))

    def greeting(self) -> bytes:
        """The first frame of a new connection: who this is, its tickets in flight and its
        fair queues' order (``Queues.replay``)."""
        events: list[Event] = [(HELLO, VERSION, self.index, self.incarnation)]
        for seq, (event, ticket) in self._live.items():
            events.append(event)
            if ticket.stage == 1:
                events.append((FIRST_BYTE, seq))
        if self.queues is not None:
            recorded = _Recorded()
            self.queues.replay(recorded)
            events.extend(recorded.events)
        return frame(events)

    # -- what comes in ------------------------------------------------------------------

    def inbound(self) -> Inbound:
        """The reader of one incoming connection."""
        return Inbound(self)

    def in_flight(self) -> int:
        """This worker's own tickets the peers are told of and not yet finished."""
        return len(self._live)


class Inbound:
    """One peer's connection into this worker: reads its frames, holds its foreign tickets
    (by the peer's ids), and finishes them all when the connection ends."""

    def __init__(self, sharing: Sharing) -> None:
        self._sharing = sharing
        self._buffer = bytearray()
        self._tickets: dict[int, ledger_mod.Ticket] = {}
        self.peer: tuple[int, str] | None = None      # (worker index, incarnation)
        self._closed = False
        self.skipped = 0        # the fair queue's events skipped as unreadable

    def feed(self, data: bytes) -> None:
        """Apply every whole frame received so far; raises :class:`FrameError` on garbage
        (the connection should then be dropped, which :meth:`close` accounts for)."""
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while len(buffer) - start >= 4:
                size = int.from_bytes(buffer[start:start + 4], "big")
                if size > MAX_FRAME:
                    raise FrameError(f"a frame of {size} bytes")
                end = start + 4 + size
                if len(buffer) < end:
                    break
                self.apply(_decode(memoryview(buffer)[start + 4:end]))
                start = end
        finally:
            del buffer[:start]

    def apply(self, events: list[Any]) -> None:
        """Apply one frame's events (decoded) to this worker's ledger, router and pins."""
        if self._closed:
            return
        sharing = self._sharing
        sharing._applying = True
        try:
            for event in events:
                self._apply(event)
        except FrameError:
            raise
        except (TypeError, ValueError, IndexError, KeyError, OverflowError) as exc:
            raise FrameError(f"malformed event: {exc!r}") from None
        finally:
            sharing._applying = False

    def _apply(self, event: list[Any]) -> None:
        kind = event[0]
        if self.peer is None:
            if kind != HELLO or event[1] != VERSION:
                raise Refused(f"expected a hello of version {VERSION}, got {event[:2]!r}",
                              repr(event[:4])[:200])
            self.peer = (int(event[2]), str(event[3]))
            return
        sharing = self._sharing
        if kind == DISPATCH:
            _, seq, backend, uncached, prompt, streams, expect_s, sequences = event
            if seq not in self._tickets:
                # Converted before the ledger moves: a malformed value would otherwise
                # raise half-way through its count and leave the rest counted forever.
                counts = int(uncached), int(prompt), float(expect_s), max(1, int(sequences))
                self._tickets[seq] = sharing.ledger.dispatch(
                    str(backend), counts[0], counts[1], bool(streams), counts[2], counts[3])
        elif kind == FIRST_BYTE:
            ticket = self._tickets.get(event[1])
            if ticket is not None:
                sharing.ledger.first_byte(ticket)
        elif kind == FINISH:
            ticket = self._tickets.pop(event[1], None)
            if ticket is not None:
                sharing.ledger.finish(ticket)
        elif kind == PREFIX:
            _, backend, hashes, capacity_blocks, restarts = event
            sharing.router.index.insert(backend, hashes, capacity_blocks, restarts)
        elif kind == SESSION:
            sharing.router.remember_session(event[1], event[2])
        elif kind == PIN:
            _, tenant, response_id, backend = event
            sharing.pins.remember(tenant, response_id, backend)
        elif kind == COST:
            sharing.router.costs.observe(*event[1:])
        elif kind == SERVED:
            if sharing.served_log is not None:
                sharing.served_log.remember(event[1], served_log.Served(*event[2:]))
        elif kind == TAKEN:
            if sharing.served_log is not None:
                sharing.served_log.take(event[1], event[2])
        elif kind == FORM:
            if sharing.forms is not None and isinstance(event[2], dict):
                sharing.forms.learn_form(event[1], event[2])
        elif kind == INVALIDATED:
            if sharing.forms is not None:
                sharing.forms.forget(_name_or_none(event[1]), _name_or_none(event[2]))
        elif kind in (HEAD, TAG, CLOCK, SHIFT, WAKE):
            if sharing.queues is not None:
                try:
                    self._apply_queue(sharing.queues, event)
                except (TypeError, ValueError, IndexError, OverflowError) as exc:
                    self._skip(event, exc)
        # an unknown kind is a newer peer's: skipped, so versions can add events

    def _apply_queue(self, queues: Queues, event: list[Any]) -> None:
        """One of the fair queue's events; raises ValueError (or the like) on a value it
        cannot take, before anything moved."""
        kind, model = event[0], str(event[1])
        if kind == WAKE:
            queues.sibling_woke(model)
            return
        rank = int(event[2])
        if not all(math.isfinite(float(x)) for x in event[3:] if not isinstance(x, str)):
            raise ValueError("a number that is not finite")
        assert self.peer is not None
        if kind == HEAD:
            seq = event[5]
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise TypeError(f"a head's request number is not an integer: {seq!r}")
            queues.sibling_head(self, self.peer[0], model, rank, float(event[3]),
                                float(event[4]), seq)
        elif kind == TAG:
            queues.sibling_tagged(self.peer[0], model, rank, str(event[3]), float(event[4]),
                                  max(0.0, float(event[5])))
        elif kind == CLOCK:
            queues.sibling_clocked(model, rank, float(event[3]))
        else:
            queues.sibling_shifted(model, rank, str(event[3]), float(event[4]))

    def _skip(self, event: list[Any], exc: Exception) -> None:
        """Skip one of the fair queue's events this worker cannot take, not the connection:
        they are order hints the sender re-tells (its head at its pump's next change, its
        tags with every request), whereas dropping the connection would finish every
        ticket the sender has in flight here (this worker would over-dispatch) and its
        greeting would replay the same value on the next connection, for ever."""
        self.skipped += 1
        if self.skipped == 1 or not self.skipped % 1000:
            log.warning("mesh: skipped a fair-queue event from worker %s it cannot take "
                        "(%d so far on this connection): %s %r", self.peer, self.skipped,
                        event[0] if event else None, exc)

    def close(self) -> None:
        """The connection ended: finish every ticket it brought (idempotent)."""
        self._closed = True
        tickets, self._tickets = self._tickets, {}
        for ticket in tickets.values():
            self._sharing.ledger.finish(ticket)
        if self._sharing.queues is not None:
            self._sharing.queues.peer_gone(self)

    def foreign(self) -> int:
        """Tickets of this connection's peer still counted in this worker's ledger."""
        return len(self._tickets)


def _finite(kind: str, model: str, *numbers: float) -> bool:
    """Whether every number of a fair-queue event is finite; else an error is logged
    and the event is not sent (a bug here, which must not split the pod's mesh)."""
    if all(math.isfinite(x) for x in numbers):
        return True
    log.error("mesh: not sending a fair-queue event %s for model %r with a number that is "
              "not finite: %r", kind, model, numbers)
    return False


def _name_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _decode(payload: memoryview) -> list[Any]:
    try:
        events = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(events, list):
        raise FrameError("a frame is an array of events")
    return events
