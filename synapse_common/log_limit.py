"""Log lines said at most once per interval per key, for events a peer can repeat at will
(an agent's stream opening and closing in a loop, a Register refused again and again).

* The first line of each key is said; more of that key within ``every_s`` are held back
  and counted, and the next line said for it carries how many were (``N more held back``),
  so a flapping node still shows, once a minute, how often it flapped.
* Keys a peer invents (node names) would each be a first line: at most ``new_keys`` keys
  not seen in the current interval are said per interval; past that they are counted in
  one summary line said when the next interval's first line comes.
* At most ``max_keys`` keys are remembered; the one said longest ago is forgotten first
  (its held count goes into the summary), so inventing keys grows no memory.

The clock is injected (:mod:`synapse_common.clock`); nothing here sleeps or starts tasks.
The existing one-purpose limiters (``controlplane.core.cache_budget.ErrorLog``, the usage
flush's ``FlushFailures``) each have a fixed set of keys and format their own message.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

from synapse_common import clock as clocks


class PerKey:
    """Say ``logger`` lines at most once per ``every_s`` per key (see the module docstring);
    ``what`` names the lines in the summary ("node stream lines")."""

    def __init__(self, logger: logging.Logger, clock: clocks.Clock, what: str, *,
                 every_s: float = 60.0, new_keys: int = 100, max_keys: int = 4096) -> None:
        self._logger = logger
        self._clock = clock
        self._what = what
        self._every = every_s
        self._new_keys = new_keys
        self._max_keys = max_keys
        self._said: dict[Hashable, float] = {}      # key -> when its last line was said
        self._held: dict[Hashable, int] = {}        # key -> lines held back since then
        self._window = -float("inf")                # when the current interval began
        self._new_in_window = 0
        self._unsaid = 0                            # lines of keys over the budget

    def log(self, level: int, key: Hashable, msg: str, *args: object,
            extra: Mapping[str, Any] | None = None) -> None:
        """Say ``msg % args`` now, or count it held back (for ``key``, or in the summary)."""
        now = self._clock()
        self._roll(now)
        last = self._said.get(key)
        if last is not None and now - last < self._every:
            self._held[key] = self._held.get(key, 0) + 1
            return
        if last is None:
            if self._new_in_window >= self._new_keys:
                self._unsaid += 1
                return
            self._new_in_window += 1
        held = self._held.pop(key, 0)
        self._said.pop(key, None)
        self._said[key] = now                       # newest last: the oldest go first
        self._forget_oldest()
        if held:
            msg, args = msg + " (%d more held back)", (*args, held)
        self._logger.log(level, msg, *args, extra=extra)

    def _roll(self, now: float) -> None:
        if now - self._window < self._every:
            return
        if self._unsaid:
            self._logger.warning("%d %s of other names held back in the last %gs (the "
                                 "first %d names each are said)", self._unsaid, self._what,
                                 self._every, self._new_keys)
        self._window, self._new_in_window, self._unsaid = now, 0, 0

    def _forget_oldest(self) -> None:
        while len(self._said) > self._max_keys:
            key = next(iter(self._said))
            del self._said[key]
            self._unsaid += self._held.pop(key, 0)
