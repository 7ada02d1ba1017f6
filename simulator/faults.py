"""Fault injection: what each knob does, and the run-time state behind ``/sim/faults``.

Knobs (same names as the flags and the ``faults`` config section):

* ``error_rate`` R: each inference request is answered HTTP 500 with an error envelope
  with probability R (seeded, so a run is reproducible).
* ``crash_after`` N: once N inference requests have been answered, the process exits
  with status :data:`CRASH_EXIT_CODE` (set at run time, it counts from that moment).
* ``hang``: inference requests and ``/health`` are accepted and never answered (until
  the client gives up); ``/metrics`` and ``/sim/faults`` keep answering so a test can
  observe and lift the fault.
* ``stall_after_chunks`` N: a stream sends N SSE events, goes silent for ``stall_s``
  wall seconds, then the connection is dropped without ``[DONE]``; a non-streaming
  request goes silent for ``stall_s`` and is dropped without an answer.
* ``slow_start_s`` (or ``slow_start``, the flag's spelling) T: for T wall seconds (from start, or from the POST that set it)
  ``/health`` answers 503 and inference requests 503, like an engine still loading.

Fault delays are wall-clock seconds, not scaled by ``--time-scale``: they exist to
exercise clients' timeouts. They are read and waited through the injected
:class:`synapse_common.clock.Time` (``monotonic`` for the slow start, ``sleep`` for a
stall), so tests run them in virtual time. ``POST /sim/faults`` takes a JSON object with any of the
names above and merges it into the current faults (``null`` clears the optional ones);
``GET /sim/faults`` returns them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pydantic

from simulator import errors
from simulator.config import FaultSettings
from synapse_common import clock as clocks

CRASH_EXIT_CODE = 3
READ_ONLY = frozenset({"served", "slow_start_remaining_s"})
ALIASES = {"slow_start": "slow_start_s"}  # the flag's spelling works in the JSON too


class Faults:
    def __init__(self, initial: FaultSettings, seed: int, time: clocks.Time) -> None:
        self.time = time
        self._rng = random.Random(seed)
        self.settings = initial
        self.served = 0
        self._served_base = 0
        self._healthy_at = time.monotonic() + initial.slow_start_s

    def update(self, changes: Mapping[str, Any]) -> FaultSettings:
        """Merge ``changes`` (validated as :class:`FaultSettings`); raises BadRequest."""
        if not isinstance(changes, Mapping):
            raise errors.BadRequest("the body must be a JSON object of fault settings")
        # What GET returns can be posted back: its read-only fields are ignored.
        changes = {ALIASES.get(k, k): v for k, v in changes.items() if k not in READ_ONLY}
        merged = {**self.settings.model_dump(), **changes}
        try:
            new = FaultSettings.model_validate(merged)
        except pydantic.ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first["loc"]) or "body"
            raise errors.BadRequest(f"{field}: {first['msg']}", param=field) from None
        if "crash_after" in changes:
            self._served_base = self.served
        if "slow_start_s" in changes:
            self._healthy_at = self.time.monotonic() + new.slow_start_s
        self.settings = new
        return new

    def view(self) -> dict[str, Any]:
        out = self.settings.model_dump()
        out["served"] = self.served
        out["slow_start_remaining_s"] = round(self.starting_for(), 3)
        return out

    def starting_for(self) -> float:
        return max(0.0, self._healthy_at - self.time.monotonic())

    def check_request(self) -> None:
        """Faults decided at arrival: slow start, error rate."""
        if self.starting_for() > 0:
            raise errors.Unavailable("the engine is starting (simulated slow start)")
        rate = self.settings.error_rate
        if rate > 0 and self._rng.random() < rate:
            raise errors.InjectedError("simulated engine failure (synapse-simulator "
                                       "fault injection: error_rate)")

    def count_served(self) -> bool:
        """Count one answered inference request; True when the process must now crash."""
        self.served += 1
        limit = self.settings.crash_after
        return limit is not None and self.served - self._served_base >= limit
