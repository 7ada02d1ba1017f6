"""Per-backend costs, learned online from what the engines actually do.

Three quantities per backend feed the TTFT prediction (:func:`controlplane.core.router.predict`):

* ``prefill_s_per_token``: seconds of prefill per uncached prompt token;
* ``decode_s_per_step``: seconds per decode step (the inter-token time of a stream);
* ``overhead_s``: the time to a first token that no prefill explains (the first forward
  step, scheduling, HTTP), seen on requests whose prompt was (nearly) all cached.

Each is learned from samples taken when a routed request settles (:meth:`CostModel.observe`):
the observed time to first token, the engine's own count of prompt and cached tokens
(``usage``) and the queue the router predicted ahead of the request. Under the model
``ttft = overhead + decode_wait + prefill_s_per_token * (queued + uncached tokens)``:

* a request with at least ``MIN_PREFILL_TOKENS`` tokens to prefill gives a
  ``prefill_s_per_token`` sample, ``(ttft - overhead - decode_wait) / tokens``;
* one with fewer gives an ``overhead_s`` sample, ``ttft - decode_wait - prefill``;
* a stream of at least ``MIN_DECODE_STEPS`` tokens gives a ``decode_s_per_step`` sample,
  ``(last byte - first token) / (tokens - 1)``;
* every one gives a sample of the prediction's own error, ``|observed - predicted TTFT|``
  (``ttft_error_s``: the router treats smaller differences between backends as noise).

Each estimate is the median of its last ``WINDOW`` samples, robust to outliers (a stalled
request, a GC pause) up to half the window, and following a real change (an engine
slowing down) within half a window. Until ``MIN_SAMPLES`` samples have arrived a backend
uses the configured constants (``router.prefill_seconds_per_token``…), so a new backend
starts where today's constant-cost router does.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

WINDOW = 63
MIN_SAMPLES = 5
MIN_PREFILL_TOKENS = 128
MIN_DECODE_STEPS = 4


class Costs(NamedTuple):
    prefill_s_per_token: float
    decode_s_per_step: float
    overhead_s: float = 0.0
    samples: int = 0          # prefill samples behind prefill_s_per_token
    ttft_error_s: float = 0.0  # typical |observed - predicted TTFT| (median)


class RunningMedian:
    """The median of the last ``window`` samples; ``default`` until ``min_samples``."""

    __slots__ = ("_min", "_sorted", "_window", "count", "default", "value")

    def __init__(self, default: float, window: int = WINDOW,
                 min_samples: int = MIN_SAMPLES) -> None:
        self._window: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []
        self._min = min_samples
        self.default = default
        self.value = default
        self.count = 0

    def add(self, sample: float) -> None:
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._window.append(sample)
        bisect.insort(self._sorted, sample)
        self.count += 1
        n = len(self._sorted)
        if n >= self._min:
            mid = n // 2
            self.value = (self._sorted[mid] if n % 2
                          else (self._sorted[mid - 1] + self._sorted[mid]) / 2)


class _Backend:
    __slots__ = ("costs", "decode", "error", "overhead", "prefill")

    def __init__(self, prefill: float, decode: float) -> None:
        self.prefill = RunningMedian(prefill)
        self.decode = RunningMedian(decode)
        self.overhead = RunningMedian(0.0)
        self.error = RunningMedian(0.0)
        self.costs = Costs(prefill, decode)

    def refresh(self) -> None:
        self.costs = Costs(self.prefill.value, self.decode.value, self.overhead.value,
                           self.prefill.count, self.error.value)


class CostModel:
    def __init__(self, prefill_s_per_token: float, decode_s_per_step: float,
                 learn: bool = True) -> None:
        self._prefill0 = prefill_s_per_token
        self._decode0 = decode_s_per_step
        self._default = Costs(prefill_s_per_token, decode_s_per_step)
        self.learn = learn
        self._backends: dict[str, _Backend] = {}
        # told of every observation (the serving workers of a pod learn from each other's
        # answers: core.shared_routing); None in a single process
        self.listener: Callable[[str, float, float, float, float, float, int, float],
                                None] | None = None

    def costs(self, backend: str) -> Costs:
        entry = self._backends.get(backend)
        return entry.costs if entry is not None else self._default

    def observe(self, backend: str, ttft_s: float, queued_tokens: float,
                uncached_tokens: float, decode_wait_s: float, stream_s: float = 0.0,
                output_tokens: int = 0, error_s: float = 0.0) -> None:
        """Learn from one settled request: its time to first token, the prefill tokens
        predicted ahead of it (KV-pressure scaled), the prompt tokens the engine computed
        (in the router's units), the decode-step part of its predicted queue wait, for a
        stream the time from first token to last byte and the tokens it sent, and how far
        the predicted TTFT was from the observed one."""
        if not self.learn:
            return
        if self.listener is not None:
            self.listener(backend, ttft_s, queued_tokens, uncached_tokens, decode_wait_s,
                          stream_s, output_tokens, error_s)
        entry = self._backends.get(backend)
        if entry is None:
            entry = self._backends[backend] = _Backend(self._prefill0, self._decode0)
        c = entry.costs
        work = queued_tokens + uncached_tokens
        explained = ttft_s - decode_wait_s
        if work >= MIN_PREFILL_TOKENS:
            entry.prefill.add(max(0.0, explained - c.overhead_s) / work)
        else:
            entry.overhead.add(max(0.0, explained - work * c.prefill_s_per_token))
        if output_tokens >= MIN_DECODE_STEPS and stream_s > 0:
            entry.decode.add(stream_s / (output_tokens - 1))
        entry.error.add(abs(error_s))
        entry.refresh()  # a tuple: cheaper than checking what moved

    def snapshot(self) -> dict[str, Costs]:
        return {k: v.costs for k, v in self._backends.items()}

    def forget(self, backend: str) -> None:
        self._backends.pop(backend, None)
