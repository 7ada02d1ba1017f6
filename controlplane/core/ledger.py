"""The in-flight ledger: what this replica has sent to each backend and not seen finish.

Per backend it holds the prompt tokens still waiting for prefill (dispatched, no first
byte yet) and the sequences decoding (first byte seen, not finished). The router reads
it as the freshest load signal it has: the agents' scraped queue metrics lag by a report
interval, the ledger is exact for this replica's own traffic.

A whole (non-streamed) answer's first byte is its last, so nothing shows when its prefill
is done. Its prompt counts as waiting for prefill until the time the router predicted for
its first token (``expect_s`` at dispatch), then as decoding: counted until the answer
ends, a flood of long batch answers would look like a prefill queue that never drains,
to the router's predictions and to the costs it learns from them. Those tokens are also
counted apart (``blind_prefill_tokens``) for the rules that must not take a guess for a
prefill queue (:mod:`saturation`).

A request takes as many of an engine's seats as the sequences it generates (``n`` times
the prompts of a completions batch: vLLM runs each as a request of its own;
:func:`validation.sequences`), so the ledger counts those too (``Load.sequences``): the seat rule of
:mod:`saturation` compares them with the engine's ``max_num_seqs``. One int on the
ticket; a request of one sequence costs what it did.

A :class:`Ticket` moves dispatch → first byte → finish; each step is idempotent, so a
handler can call ``finish`` in ``finally`` whatever happened before. Each step is stamped
with the ledger's clock: the router learns its costs from those times
(:meth:`controlplane.core.router.Router.observe`).

Worker processes of one pod share their tickets (:mod:`shared_routing`): a ledger with a
:attr:`Ledger.listener` tells it of every step, so sibling workers count this worker's
requests as their own. Without one (a single worker) the cost is one ``None`` check a step.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Any, Protocol

from synapse_common import clock as clocks


@dataclasses.dataclass(slots=True)
class Load:
    prefill_tokens: int = 0     # uncached prompt tokens waiting for their first byte
    blind_prefill_tokens: int = 0   # the part of those whose answer is not streamed
    prefilling: int = 0         # requests waiting for their first byte
    decoding: int = 0           # requests streaming their answer
    sequences: int = 0          # sequences those requests generate (the seats they take)
    dispatched: int = 0         # total ever dispatched (for averages)
    prompt_tokens_total: int = 0

    @property
    def in_flight(self) -> int:
        return self.prefilling + self.decoding

    @property
    def mean_prompt_tokens(self) -> float:
        return self.prompt_tokens_total / self.dispatched if self.dispatched else 0.0


@dataclasses.dataclass(slots=True)
class Ticket:
    backend: str
    prefill_tokens: int
    stage: int = 0              # 0 prefilling, 1 decoding, 2 finished
    dispatched_at: float = 0.0
    first_byte_at: float | None = None
    finished_at: float | None = None
    prediction: Any = None      # the router's Verdict and queue detail (router.Dispatched)
    streamed: bool = False      # first_byte was a streamed token (a true TTFT)
    usage: Any = None           # the engine's usage, when the proxy found it
    blind: bool = False         # a whole answer: no first token to see before its end
    prefilled: bool = False     # counted as decoding (first byte seen, or assumed for a
                                # whole answer past its predicted first token)
    seq: int = -1               # its id among sibling workers (set by the listener, if any)
    sequences: int = 1          # sequences it generates: n x its prompts (seats it takes)


class Listener(Protocol):
    """Told of each step of every ticket (a mesh sharing them with sibling workers)."""

    def dispatched(self, ticket: Ticket, uncached_tokens: int, prompt_tokens: int,
                   streams: bool, expect_s: float) -> None: ...

    def first_byte(self, ticket: Ticket) -> None: ...

    def finished(self, ticket: Ticket) -> None: ...


class Ledger:
    def __init__(self, clock: clocks.Clock = clocks.monotonic) -> None:
        self._load: dict[str, Load] = {}
        self._clock = clock
        # per backend: whole answers by the time their prefill is assumed done
        self._blind: dict[str, list[tuple[float, int, Ticket]]] = {}
        self._seq = itertools.count()
        self.listener: Listener | None = None

    def load(self, backend: str) -> Load:
        load = self._of(backend)
        due = self._blind.get(backend)
        if due and due[0][0] <= self._clock():
            self._expire(due)
        return load

    def dispatch(self, backend: str, uncached_tokens: int, prompt_tokens: int,
                 streams: bool = True, expect_s: float = 0.0, sequences: int = 1) -> Ticket:
        """Count a request sent; ``expect_s``: its predicted time to first token (how long
        a whole answer's prompt counts as waiting for prefill); ``sequences``: the seats
        it takes (:attr:`validation.Parsed.sequences`)."""
        load = self.load(backend)
        load.prefill_tokens += uncached_tokens
        if not streams:
            load.blind_prefill_tokens += uncached_tokens
        load.prefilling += 1
        load.sequences += sequences
        load.dispatched += 1
        load.prompt_tokens_total += prompt_tokens
        now = self._clock()
        ticket = Ticket(backend, uncached_tokens, dispatched_at=now, blind=not streams,
                        sequences=sequences)
        if not streams:
            heapq.heappush(self._blind.setdefault(backend, []),
                           (now + max(0.0, expect_s), next(self._seq), ticket))
        if self.listener is not None:
            self.listener.dispatched(ticket, uncached_tokens, prompt_tokens, streams, expect_s)
        return ticket

    def first_byte(self, ticket: Ticket) -> None:
        if ticket.stage != 0:
            return
        ticket.first_byte_at = self._clock()
        self._prefilled(ticket)
        ticket.stage = 1
        if self.listener is not None:
            self.listener.first_byte(ticket)

    def finish(self, ticket: Ticket) -> None:
        if ticket.stage == 2:
            return
        load = self.load(ticket.backend)
        if ticket.prefilled:
            load.decoding -= 1
        else:                   # never answered: no first byte to stamp
            self._unqueue(load, ticket)
            load.prefilling -= 1
        load.sequences -= ticket.sequences
        ticket.finished_at = self._clock()
        ticket.stage = 2
        due = self._blind.get(ticket.backend)
        if ticket.blind and due and len(due) > 2 * load.in_flight + 64:
            # answers that ended before their predicted first token: drop them now
            due[:] = [entry for entry in due if entry[2].stage != 2]
            heapq.heapify(due)
        if self.listener is not None:
            self.listener.finished(ticket)

    def snapshot(self) -> dict[str, Load]:
        return {k: dataclasses.replace(v) for k, v in self._load.items()}

    def _prefilled(self, ticket: Ticket) -> None:
        if ticket.prefilled:
            return
        ticket.prefilled = True
        load = self._of(ticket.backend)
        self._unqueue(load, ticket)
        load.prefilling -= 1
        load.decoding += 1

    def _of(self, backend: str) -> Load:
        load = self._load.get(backend)
        if load is None:
            load = self._load[backend] = Load()
        return load

    @staticmethod
    def _unqueue(load: Load, ticket: Ticket) -> None:
        load.prefill_tokens -= ticket.prefill_tokens
        if ticket.blind:
            load.blind_prefill_tokens -= ticket.prefill_tokens

    def _expire(self, due: list[tuple[float, int, Ticket]]) -> None:
        now = self._clock()
        while due and due[0][0] <= now:
            ticket = heapq.heappop(due)[2]
            if ticket.stage == 0:
                self._prefilled(ticket)
