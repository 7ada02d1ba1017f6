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
  ``(last byte - first token) / (tokens - 1)``.

Each estimate is the median of its last ``WINDOW`` samples, robust to outliers (a stalled
request, a GC pause) up to half the window, and following a real change (an engine
slowing down) within half a window. Until ``MIN_SAMPLES`` samples have arrived a backend
uses the configured constants (``router.prefill_seconds_per_token``…), so a new backend
starts where today's constant-cost router does.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import deque

WINDOW = 63
MIN_SAMPLES = 5
MIN_PREFILL_TOKENS = 128
MIN_DECODE_STEPS = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Costs:
    prefill_s_per_token: float
    decode_s_per_step: float
    overhead_s: float = 0.0
    samples: int = 0          # prefill samples behind prefill_s_per_token


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
        if len(self._sorted) >= self._min:
            n = len(self._sorted)
            mid = n // 2
            self.value = (self._sorted[mid] if n % 2
                          else (self._sorted[mid - 1] + self._sorted[mid]) / 2)


class _Backend:
    __slots__ = ("costs", "decode", "overhead", "prefill")

    def __init__(self, prefill: float, decode: float) -> None:
        self.prefill = RunningMedian(prefill)
        self.decode = RunningMedian(decode)
        self.overhead = RunningMedian(0.0)
        self.costs = Costs(prefill, decode)

    def refresh(self) -> None:
        self.costs = Costs(self.prefill.value, self.decode.value, self.overhead.value,
                           self.prefill.count)


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One settled request, as the cost model needs it."""

    ttft_s: float              # dispatch → first token
    queued_tokens: float       # prefill tokens predicted ahead of it (KV-pressure scaled)
    uncached_tokens: float     # prompt tokens the engine computed, in the router's units
    decode_wait_s: float       # the decode-step part of the predicted queue wait
    stream_s: float = 0.0      # first token → last byte (streams only)
    output_tokens: int = 0


class CostModel:
    def __init__(self, prefill_s_per_token: float, decode_s_per_step: float,
                 learn: bool = True) -> None:
        self._prefill0 = prefill_s_per_token
        self._decode0 = decode_s_per_step
        self._default = Costs(prefill_s_per_token, decode_s_per_step)
        self.learn = learn
        self._backends: dict[str, _Backend] = {}

    def costs(self, backend: str) -> Costs:
        entry = self._backends.get(backend)
        return entry.costs if entry is not None else self._default

    def observe(self, backend: str, s: Sample) -> None:
        if not self.learn:
            return
        entry = self._backends.get(backend)
        if entry is None:
            entry = self._backends[backend] = _Backend(self._prefill0, self._decode0)
        c = entry.costs
        work = s.queued_tokens + s.uncached_tokens
        explained = s.ttft_s - s.decode_wait_s
        if work >= MIN_PREFILL_TOKENS:
            entry.prefill.add(max(0.0, explained - c.overhead_s) / work)
        else:
            entry.overhead.add(max(0.0, explained - work * c.prefill_s_per_token))
        if s.output_tokens >= MIN_DECODE_STEPS and s.stream_s > 0:
            entry.decode.add(s.stream_s / (s.output_tokens - 1))
        entry.refresh()

    def snapshot(self) -> dict[str, Costs]:
        return {k: v.costs for k, v in self._backends.items()}

    def forget(self, backend: str) -> None:
        self._backends.pop(backend, None)
