"""Request statistics for ``GET /api/v1/stats`` and ``Admin.GetStats``.

Prometheus histograms answer "how is the fleet doing" for dashboards; this answers "what
is this replica seeing now" without a Prometheus server: counts and latency percentiles
per model and per backend over a bounded window of recent requests (a ring of the last
``WINDOW`` durations each, so memory is fixed and old traffic ages out).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from synapse_common import clock as clocks

WINDOW = 2048


@dataclasses.dataclass(slots=True)
class Series:
    requests: int = 0
    errors: int = 0
    recent: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, seconds: float, error: bool) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        else:
            self.recent.append(seconds)

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.recent)

        def pct(q: float) -> float:
            if not ordered:
                return 0.0
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0

        return {"requests": self.requests, "errors": self.errors, "p50_ms": pct(0.50),
                "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


class Stats:
    def __init__(self, clock: clocks.Clock, replica: str) -> None:
        self._clock = clock
        self._started = clock()
        self.replica = replica
        self.requests_total = 0
        self.cache: dict[str, int] = {"hit-exact": 0, "hit-semantic": 0, "miss": 0,
                                      "bypass": 0, "error": 0}
        self.per_model: dict[str, Series] = {}
        self.per_backend: dict[str, Series] = {}

    def record(self, model: str, backend: str | None, seconds: float, error: bool,
               cache_status: str) -> None:
        self.requests_total += 1
        if cache_status in self.cache:
            self.cache[cache_status] += 1
        # get-then-create rather than setdefault(key, Series()): that built (and threw
        # away) a Series and its deque on every request.
        if model:
            series = self.per_model.get(model)
            if series is None:
                series = self.per_model[model] = Series()
            series.add(seconds, error)
        if backend:
            series = self.per_backend.get(backend)
            if series is None:
                series = self.per_backend[backend] = Series()
            series.add(seconds, error)

    def cache_error(self) -> None:
        self.cache["error"] += 1

    @property
    def cache_hit_rate(self) -> float:
        hits = self.cache["hit-exact"] + self.cache["hit-semantic"]
        looked_up = hits + self.cache["miss"]
        return hits / looked_up if looked_up else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "uptime_seconds": self._clock() - self._started,
            "requests_total": self.requests_total,
            "cache_hit_rate": self.cache_hit_rate,
            "cache_hits_exact": self.cache["hit-exact"],
            "cache_hits_semantic": self.cache["hit-semantic"],
            "cache_misses": self.cache["miss"],
            "cache_bypass": self.cache["bypass"],
            "cache_errors": self.cache["error"],
            "per_model": {k: v.summary() for k, v in sorted(self.per_model.items())},
            "per_backend": {k: v.summary() for k, v in sorted(self.per_backend.items())},
        }
