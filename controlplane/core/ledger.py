"""The in-flight ledger: what this replica has sent to each backend and not seen finish.

Per backend it holds the prompt tokens still waiting for prefill (dispatched, no first
byte yet) and the sequences decoding (first byte seen, not finished). The router reads
it as the freshest load signal it has: the agents' scraped queue metrics lag by a report
interval, the ledger is exact for this replica's own traffic.

A :class:`Ticket` moves dispatch → first byte → finish; each step is idempotent, so a
handler can call ``finish`` in ``finally`` whatever happened before.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Load:
    prefill_tokens: int = 0     # uncached prompt tokens waiting for their first byte
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


class Ledger:
    def __init__(self) -> None:
        self._load: dict[str, Load] = {}

    def load(self, backend: str) -> Load:
        load = self._load.get(backend)
        if load is None:
            load = self._load[backend] = Load()
        return load

    def dispatch(self, backend: str, uncached_tokens: int, prompt_tokens: int) -> Ticket:
        load = self.load(backend)
        load.prefill_tokens += uncached_tokens
        load.prefilling += 1
        load.dispatched += 1
        load.prompt_tokens_total += prompt_tokens
        return Ticket(backend, uncached_tokens)

    def first_byte(self, ticket: Ticket) -> None:
        if ticket.stage != 0:
            return
        load = self.load(ticket.backend)
        load.prefill_tokens -= ticket.prefill_tokens
        load.prefilling -= 1
        load.decoding += 1
        ticket.stage = 1

    def finish(self, ticket: Ticket) -> None:
        if ticket.stage == 2:
            return
        self.first_byte(ticket)
        self.load(ticket.backend).decoding -= 1
        ticket.stage = 2

    def snapshot(self) -> dict[str, Load]:
        return {k: dataclasses.replace(v) for k, v in self._load.items()}
