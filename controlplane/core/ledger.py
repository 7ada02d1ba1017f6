"""The in-flight ledger: what this replica has sent to each backend and not seen finish.

Per backend it holds the prompt tokens still waiting for prefill (dispatched, no first
byte yet) and the sequences decoding (first byte seen, not finished). A whole
(non-streamed) answer's first byte is its last, so its prompt stays "waiting for prefill"
until it ends; those tokens are also counted apart (``blind_prefill_tokens``) for the
rules that must not mistake them for a prefill queue (:mod:`saturation`). The router reads
it as the freshest load signal it has: the agents' scraped queue metrics lag by a report
interval, the ledger is exact for this replica's own traffic.

A :class:`Ticket` moves dispatch → first byte → finish; each step is idempotent, so a
handler can call ``finish`` in ``finally`` whatever happened before. Each step is stamped
with the ledger's clock: the router learns its costs from those times
(:meth:`controlplane.core.router.Router.observe`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from synapse_common import clock as clocks


@dataclasses.dataclass(slots=True)
class Load:
    prefill_tokens: int = 0     # uncached prompt tokens waiting for their first byte
    blind_prefill_tokens: int = 0   # the part of those whose answer is not streamed
    prefilling: int = 0         # requests waiting for their first byte
    decoding: int = 0           # requests streaming their answer
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


class Ledger:
    def __init__(self, clock: clocks.Clock = clocks.monotonic) -> None:
        self._load: dict[str, Load] = {}
        self._clock = clock

    def load(self, backend: str) -> Load:
        load = self._load.get(backend)
        if load is None:
            load = self._load[backend] = Load()
        return load

    def dispatch(self, backend: str, uncached_tokens: int, prompt_tokens: int,
                 streams: bool = True) -> Ticket:
        load = self.load(backend)
        load.prefill_tokens += uncached_tokens
        if not streams:
            load.blind_prefill_tokens += uncached_tokens
        load.prefilling += 1
        load.dispatched += 1
        load.prompt_tokens_total += prompt_tokens
        return Ticket(backend, uncached_tokens, dispatched_at=self._clock(), blind=not streams)

    def first_byte(self, ticket: Ticket) -> None:
        if ticket.stage != 0:
            return
        ticket.first_byte_at = self._clock()
        load = self.load(ticket.backend)
        load.prefill_tokens -= ticket.prefill_tokens
        if ticket.blind:
            load.blind_prefill_tokens -= ticket.prefill_tokens
        load.prefilling -= 1
        load.decoding += 1
        ticket.stage = 1

    def finish(self, ticket: Ticket) -> None:
        if ticket.stage == 2:
            return
        if ticket.stage == 0:  # never answered: no first byte to stamp
            load = self.load(ticket.backend)
            load.prefill_tokens -= ticket.prefill_tokens
            if ticket.blind:
                load.blind_prefill_tokens -= ticket.prefill_tokens
            load.prefilling -= 1
        else:
            self.load(ticket.backend).decoding -= 1
        ticket.finished_at = self._clock()
        ticket.stage = 2

    def snapshot(self) -> dict[str, Load]:
        return {k: dataclasses.replace(v) for k, v in self._load.items()}
