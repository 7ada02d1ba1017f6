"""Whether a backend is saturated: the one rule the fair queue holds requests by.

A backend is saturated when a request sent there now would wait inside the engine, which
knows nothing of tenants, instead of in the control plane's fair queue. Two causes, two
signals, both read from this replica's exact in-flight ledger between the engines' lagging
reports:

* **Every seat taken.** An engine runs at most so many sequences at once (vLLM's
  ``max_num_seqs``, or fewer when its KV cache is the limit); past that, requests wait in
  its FIFO queue for a sequence to finish. A static upstream's ``max_num_seqs`` gives the
  count, and so does an agent's engine whose command line sets ``--max-num-seqs`` (the
  agent reports it); otherwise the queue learns one per backend: the largest ``running``
  of an engine report that shows requests ``waiting`` while ``running`` did not grow since
  the report before (the engine held at its limit; while it ramps up, requests that
  arrived during the current step show as waiting with seats still free). The limit never
  shrinks: once the queue holds the engine at it, every report finds a few requests just
  sent and a few seats just freed, which would ratchet it down. A limit learned too low
  would never correct itself either (the queue would never let the engine show more), so
  the queue probes: when a report shows the engine running at the limit the lower classes
  may fill, with nobody waiting, it lets a few more requests on (1, then twice as many at
  each such report, at most an eighth of the limit), until a report shows a queue again.
  Probing stops once a report shows requests waiting at exactly the learned limit (held
  there twice: no more seats to look for), so that the probe does not take the seats kept
  for the top class. An engine restart forgets the limit. Learning is a fallback: requests
  that arrive during a step show as waiting with seats free, and under a flood of arrivals
  nearly every report shows some, so a dip in ``running`` during the first ramp can be
  taken for the limit and then confirmed; a configured ``max_num_seqs`` has none of that.
  A limit that shrinks later (KV cache pressure) is not learned: requests then queue in
  the engine again, as without the fair queue. Saturated when the requests this replica
  has in flight there, plus those the engine reports waiting beyond them (other
  replicas'), reach it — counted in sequences, as the engine counts them: a request of
  ``n: 4``, or a completions batch of four prompts, takes four seats, and goes on where
  all four are free, so that it neither overfills the engine, whose FIFO would then start
  its sequences ahead of requests the fair queue put before them, nor, from a lower
  class, takes seats kept for the highest. A request larger than the seats its class may
  take would overfill however long it waited: one free seat will do for it (and an empty
  backend takes any request). The fair queue bounds how long a request at its head holds
  the seats that free for it (``fairness.queue.max_seat_hold_s``, :mod:`fair_queue`):
  other replicas, filling seats as they free, may never leave enough of them free at
  once; after that bound it too goes with one seat free, and then a lower class's request
  can take reserved seats. Until a backend has shown its limit once, this signal is
  silent.
  With several replicas each one sees the others only through the engine's reports, so
  together they may fill a backend's queue by up to a report interval's worth.
* **Prefill queued ahead.** Long prompts can saturate an engine with seats to spare: the
  prefill the router predicts queued ahead of a request (:attr:`types.Basis.queued_tokens`,
  requests sent and not yet at their first token), in seconds, above
  ``fairness.queue.max_queue_wait_s``. Only answers that stream count here: a whole
  (non-streamed) answer shows no first token, so the ledger only guesses when its prefill
  is done (at the first token the router predicted), and a guess that runs long would
  close the backend to a flood of batch requests while most of its seats sit empty. The
  seat signal bounds those instead.

The highest priority class may take every seat; the others leave ``reserve`` of them
(a share of the limit, rounded up, always leaving them one) to it, so that an
interactive request finds a seat free at once instead of waiting for one of a batch
flood's to end: a small, bounded cost in throughput when the flood alone saturates.

The fixed time to a first token and the decode step are left out of the comparison: they
are there whether the backend is saturated or not, and the fixed part is learned from
first tokens that, under saturation, include the wait for a seat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from controlplane.core import ledger as ledger_mod
from controlplane.core import types


class Saturation:
    def __init__(self, ledger: ledger_mod.Ledger, bound_s: float,
                 reserve: float = 0.0,
                 on_seats: Callable[[str, int | None], None] | None = None) -> None:
        self._ledger = ledger
        self._on_seats = on_seats or (lambda key, seats: None)  # a limit learned or forgot
        self.bound_s = bound_s
        self.reserve = reserve              # share of the seats kept for the top class
        self._seats: dict[str, int] = {}     # backend key -> the engine's learned limit
        self._probe: dict[str, int] = {}     # requests let on beyond it, to look for more
        self._confirmed: set[str] = set()    # limits seen twice: no more probing
        self._reports: dict[str, tuple[int, int, int]] = {}  # its last (running, waiting,
                                                              # restarts) seen

    def seats(self, key: str) -> int | None:
        """The sequences the backend ran at once when it last showed requests waiting."""
        return self._seats.get(key)

    def learn(self, backend: types.BackendState) -> None:
        """Note the backend's seat limit when its reports show it held at that limit."""
        if backend.max_num_seqs:
            return              # configured: nothing to learn, nothing to probe for
        key = backend.key
        report = (backend.running, backend.waiting, backend.restarts)
        last = self._reports.get(key)
        if last == report:          # the same report again (or an identical one)
            return
        self._reports[key] = report
        if last is None:
            return
        running, waiting = backend.running, backend.waiting
        if report[2] != last[2]:
            if self._seats.pop(key, None) is not None:
                self._on_seats(key, None)
            self._probe.pop(key, None)
            self._confirmed.discard(key)
            return
        seats = self._seats.get(key)
        if waiting > 0:
            self._probe[key] = 0        # a queue: let no more on than the limit
            if running == seats:        # held at the limit again: no more seats to look for
                self._confirmed.add(key)
            elif 0 < running <= last[0]:    # and not ramping up: the limit
                self._set(key, max(running, seats or 0))
        elif (seats is not None and key not in self._confirmed and not waiting
              and running >= seats - self.reserved(seats)):
            # Filled as far as the queue lets it, and no queue: maybe more seats.
            self._set(key, max(running, seats))
            self._probe[key] = min(max(1, 2 * self._probe.get(key, 0)), max(1, seats // 8))

    def _set(self, key: str, seats: int) -> None:
        if self._seats.get(key) != seats:
            self._seats[key] = seats
            self._on_seats(key, seats)

    def reserved(self, seats: int) -> int:
        """Seats of ``seats`` that only the highest class may take (one left to others)."""
        return min(seats - 1, math.ceil(seats * self.reserve))

    def queued_s(self, v: types.Verdict) -> float:
        """The prefill predicted queued ahead of a request on ``v``'s backend, in seconds,
        without the prompts of whole answers in flight (their first token is never seen)."""
        if v.basis is None:
            return v.queue_wait_s
        blind = self._ledger.load(v.backend.key).blind_prefill_tokens
        return max(0.0, v.basis.queued_tokens - blind) * v.basis.prefill_s_per_token

    def seats_full(self, backend: types.BackendState, top: bool = True,
                   sequences: int = 1) -> bool:
        """Whether a request of ``sequences`` seats finds too few free on ``backend``."""
        seats = backend.max_num_seqs or self._seats.get(backend.key)
        if not seats:
            return False
        probe = 0 if backend.max_num_seqs else self._probe.get(backend.key, 0)
        if not top:
            seats -= self.reserved(seats)
        seats += probe
        mine = self._ledger.load(backend.key).sequences     # seats, not requests
        # Other replicas' requests: what the engine reports waiting beyond everything we
        # have in flight there, as the router counts them. Reports lag, so comparing the
        # whole reported occupancy with ours would keep a seat "taken" by one of our own
        # requests that has finished since, until the next report.
        foreign = max(0, backend.waiting - mine)
        taken = mine + foreign
        if sequences > seats:   # it overfills however long it waits: one free seat will do
            sequences = 1
        return taken > 0 and taken + sequences > seats

    def saturated(self, v: types.Verdict, top: bool = True, sequences: int = 1) -> bool:
        """For a request of the highest class (``top``) or of another, of ``sequences``
        seats."""
        self.learn(v.backend)
        return (self.seats_full(v.backend, top, sequences)
                or self.queued_s(v) > self.bound_s)

    def room(self, verdicts: Iterable[types.Verdict], top: bool = True,
             sequences: int = 1) -> bool:
        """Whether some eligible backend of these verdicts has room for a request of
        ``sequences`` seats."""
        return any(v.eligible and not self.saturated(v, top, sequences) for v in verdicts)
