"""Restart policy: capped, jittered exponential backoff plus crash-loop detection.

Pure logic with an injected clock and random source, so tests drive it without sleeping.

* Delay for the n-th consecutive failure: ``initial * 2**n`` capped at ``cap``, then
  multiplied by a jitter factor in [0.8, 1.2] (and capped again) so a node full of
  engines that died together does not restart them in lock-step.
* The consecutive-failure count resets once an engine has stayed ready for ``cap``
  seconds: a process that crashes once a day restarts after ~1 s, not after 60 s.
* Crash loop: when ``threshold`` restarts already happened inside ``window`` seconds, the
  next exit is a ``crashloop``: the engine is still restarted, but only after
  ``retry_s`` (jittered down by up to 20 %), for as long as it keeps failing: what made it
  fail (a busy GPU, a taken port) may go away, and a node must not need a person to
  notice; the period is longer than the backoff's cap because every retry loads a model
  again. An engine stays in ``crashloop`` while it keeps failing, however few of its
  retries the window holds; one that became ready and stayed up for ``cap`` seconds
  leaves it (and falls back into it only by failing ``threshold`` times in the window
  again).
  :meth:`RestartPolicy.reset` (the operator deploying the backend again: a
  DesiredBackends command naming it in ``retry``) starts afresh; a command that merely
  lists it again does not.
"""

from __future__ import annotations

import collections
import dataclasses
import random

from synapse_common.clock import Clock

JITTER = 0.2
CAPPED = 64  # an attempt number whose delay is always the cap (jittered)


class Backoff:
    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = max(cap, initial)
        self._rng = rng or random.Random()

    def base(self, attempt: int) -> float:
        # Bound the exponent so huge attempt counts never overflow a float.
        return float(min(self.cap, self.initial * 2 ** min(attempt, CAPPED)))

    def delay(self, attempt: int) -> float:
        factor = self._rng.uniform(1 - JITTER, 1 + JITTER)
        return min(self.cap, self.base(attempt) * factor)

    def jitter_down(self) -> float:
        """A factor in [1 - JITTER, 1]: a fixed period, spread so engines that fail
        together do not retry in lock-step."""
        return self._rng.uniform(1 - JITTER, 1.0)


@dataclasses.dataclass(frozen=True)
class Decision:
    delay_s: float          # before the next start
    reason: str
    crashloop: bool = False


@dataclasses.dataclass(eq=False)
class RestartPolicy:
    """Decides, at each engine exit, when to start it again and whether it crash-loops."""

    clock: Clock
    backoff: Backoff
    threshold: int
    window_s: float
    retry_s: float = 0.0    # a crash loop's retry period; 0: the backoff's cap
    _restarts: collections.deque[float] = dataclasses.field(
        default_factory=collections.deque, init=False)
    _attempt: int = dataclasses.field(default=0, init=False)
    _ready_since: float | None = dataclasses.field(default=None, init=False)
    _looping: bool = dataclasses.field(default=False, init=False)

    def on_ready(self) -> None:
        self._ready_since = self.clock()

    def on_exit(self, loaded: bool = True) -> Decision:
        """The decision at an exit; ``loaded`` False for a start that stopped before it
        loaded anything (its port was taken): a crash loop retries that at the backoff's
        cap, not at ``retry_s``."""
        now = self.clock()
        if self._ready_since is not None and now - self._ready_since >= self.backoff.cap:
            self._attempt = 0  # it ran fine for a while: start the ladder again
            self._looping = False
        self._ready_since = None
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        looping = self._looping = self._looping or len(self._restarts) >= self.threshold
        if looping:
            period = max(self.retry_s if loaded else 0.0, self.backoff.cap)
            delay = period * self.backoff.jitter_down()
        else:
            delay = self.backoff.delay(self._attempt)
        self._attempt += 1
        self._restarts.append(now)
        if looping:
            recent = len(self._restarts) - 1
            why = (f"{recent} restarts within {self.window_s:g}s" if recent >= self.threshold
                   else "still failing")
            return Decision(delay, f"{why}; retry in {delay:.1f}s", True)
        return Decision(delay, f"restart in {delay:.1f}s")

    def reset(self) -> None:
        self._restarts.clear()
        self._attempt = 0
        self._ready_since = None
        self._looping = False
