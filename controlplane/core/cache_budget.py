"""Fail open, in budget: every cache call runs within a time budget, and a failure is
counted (``synapse_cache_errors_total{layer}``) and logged at most once per interval per
layer, never raised to the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from controlplane import metrics as metrics_mod
from synapse_common.clock import Clock

log = logging.getLogger("synapse.cache")


class Failed(Exception):
    """A cache layer failed or ran out of time; already counted and logged."""


class ErrorLog:
    """Log the first failure of a layer per interval; count the ones held back."""

    def __init__(self, interval_s: float, clock: Clock) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, layer: str, what: str, exc: BaseException) -> None:
        now = self._clock()
        last = self._last.get(layer)
        if last is not None and now - last < self._interval:
            self._held[layer] = self._held.get(layer, 0) + 1
            return
        held = self._held.pop(layer, 0)
        self._last[layer] = now
        detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        more = f" ({held} more since the last report)" if held else ""
        log.warning("cache %s failed during %s, serving without it: %s%s",
                    layer, what, detail, more)


class Budget:
    def __init__(self, metrics: metrics_mod.Metrics, log_interval_s: float,
                 clock: Clock) -> None:
        self._metrics = metrics
        self._errors = ErrorLog(log_interval_s, clock)

    async def within(self, coro: Coroutine[Any, Any, Any], budget_s: float, layer: str,
                     what: str) -> Any:
        """Await ``coro`` for at most ``budget_s``; :class:`Failed` on error or time-out."""
        try:
            if budget_s <= 0:
                coro.close()
                raise TimeoutError
            async with asyncio.timeout(budget_s):
                return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.count(layer, what, exc)
            raise Failed from exc

    def count(self, layer: str, what: str, exc: BaseException) -> None:
        self._metrics.cache_errors.labels(layer=layer).inc()
        self._errors.report(layer, what, exc)
